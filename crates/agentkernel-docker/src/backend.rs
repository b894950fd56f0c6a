//! Docker and Podman behind the [`Backend`] interface: one implementation
//! over the Engine API, the engine's flavor deciding the few differences.
//! One-shot runs go to `oneshot.rs` (or the warm pool, `pool.rs`), kept
//! sandboxes to `kept.rs`.

use agentkernel_core::backend::{
    Backend, BackendKind, Capabilities, Collected, Probe, RunOptions, Support,
};
use agentkernel_core::image_build::BuildSpec;
use agentkernel_core::spec::{ExecRequest, Outcome, PullPolicy, SandboxSpec};
use agentkernel_core::state::{SandboxRecord, Store};
use std::cell::OnceCell;
use std::path::Path;

use agentkernel_core::Result;
use bollard::models::ContainerStateStatusEnum;

use crate::engine::Flavor;
use crate::{copy, gc, kept, oneshot, podman, pool, stop, Engine};

/// Connected on first use, so a run refused by `admit` (or a `--dry-run`)
/// never starts a Podman service.
pub struct EngineBackend {
    flavor: Flavor,
    engine: OnceCell<Engine>,
    store: Store,
}

impl EngineBackend {
    /// Docker at `$DOCKER_HOST` or the default socket.
    pub fn docker(store: Store) -> EngineBackend {
        EngineBackend {
            flavor: Flavor::Docker,
            engine: OnceCell::new(),
            store,
        }
    }

    /// Podman's compatible API, starting agentkernel's private service when
    /// no socket is listening.
    pub fn podman(store: Store) -> EngineBackend {
        EngineBackend {
            flavor: Flavor::Podman,
            engine: OnceCell::new(),
            store,
        }
    }

    /// Over an engine already connected.
    pub fn from_engine(engine: Engine, store: Store) -> EngineBackend {
        EngineBackend {
            flavor: engine.flavor,
            engine: OnceCell::from(engine),
            store,
        }
    }

    /// The engine, connected now if it was not yet.
    pub fn engine(&self) -> Result<&Engine> {
        if let Some(engine) = self.engine.get() {
            return Ok(engine);
        }
        let engine = match self.flavor {
            Flavor::Docker => Engine::connect()?,
            Flavor::Podman => Engine::connect_podman()?,
        };
        Ok(self.engine.get_or_init(|| engine))
    }
}

#[async_trait::async_trait(?Send)]
impl Backend for EngineBackend {
    fn kind(&self) -> BackendKind {
        match self.flavor {
            Flavor::Docker => BackendKind::Docker,
            Flavor::Podman => BackendKind::Podman,
        }
    }

    fn capabilities(&self) -> Capabilities {
        // Docker and Podman cannot cap a container's writable layer on
        // common storage set-ups (overlay2 needs XFS with project quotas),
        // nor the copy-on-write workspace's upper layer. Under restrictive
        // every writable place is a sized tmpfs, so the cap holds there. (The
        // profiles' own disk defaults are documented as not enforced here.)
        let no_disk_cap = Support::no(
            format!(
                "on the {} backend (the engine cannot cap a container's writable layers here)",
                self.flavor.name()
            ),
            "use the native backend (-B native), or --profile restrictive, whose writable places are size-capped tmpfs",
        );
        Capabilities {
            disk_cap_root: no_disk_cap.clone(),
            disk_cap_workspace: no_disk_cap,
            // The proxy's socket is bound inside the container's network
            // namespace (`egress.rs`), which takes root.
            egress_proxy: if is_root() {
                Support::Yes
            } else {
                Support::no(
                    format!("on the {} backend without root", self.flavor.name()),
                    "run agentkernel as root: the proxy's socket is bound inside the container's network namespace",
                )
            },
            warm_pool: true,
            ..Capabilities::all()
        }
    }

    async fn run(&self, spec: &SandboxSpec, options: &RunOptions<'_>) -> Result<Outcome> {
        let (engine, store) = (self.engine()?, &self.store);
        if let Some(notice) = &options.notice {
            eprintln!("{notice}");
        }
        let resolved;
        let spec = if agentkernel_core::observe::enabled() {
            // A receipt names the image by content: resolve (and pull) it
            // first; it is then in the engine, so the run does not pull it again.
            let digest = crate::pull::ensure_image(engine, &spec.image, spec.pull).await?;
            agentkernel_core::observe::image_digest(digest);
            resolved = SandboxSpec {
                pull: PullPolicy::Missing,
                ..spec.clone()
            };
            &resolved
        } else {
            spec
        };
        if spec.keep.is_some() {
            return kept::run(
                engine,
                spec,
                store,
                &options.secret_files,
                &options.files,
                options.secrets,
            )
            .await;
        }
        if options.warm_pool {
            let config = options.config;
            let settings = pool::Settings {
                size: config.pool_size.unwrap_or(pool::DEFAULT_SIZE),
                idle_ttl: config.pool_idle_ttl.unwrap_or(pool::DEFAULT_IDLE_TTL),
                max_total: config.pool_max_total.unwrap_or(pool::DEFAULT_MAX_TOTAL),
            };
            return pool::run(engine, spec, store, settings).await;
        }
        oneshot::run_with_secrets(
            engine,
            spec,
            store,
            &options.secret_files,
            &options.files,
            options.secrets,
        )
        .await
    }

    async fn exec(&self, record: &SandboxRecord, request: &ExecRequest) -> Result<Outcome> {
        let command = kept::exec(self.engine()?, &self.store, &record.name, request);
        agentkernel_native::egress::observing_kept(&self.store, &record.name, command).await
    }

    async fn create(
        &self,
        spec: &SandboxSpec,
        options: &RunOptions<'_>,
        reserved: &dyn Fn() -> Result<()>,
    ) -> Result<()> {
        let engine = self.engine()?;
        if let Some(notice) = &options.notice {
            eprintln!("{notice}");
        }
        kept::create(
            engine,
            spec,
            &self.store,
            &[],
            &options.files,
            options.secrets,
        )
        .await?;
        kept::setup(engine, spec, &self.store).await?;
        if let Err(e) = reserved() {
            let name = &spec.keep.as_ref().expect("create always keeps").name;
            let _ = kept::remove(engine, &self.store, name).await;
            return Err(e);
        }
        Ok(())
    }

    async fn stop(&self, name: &str) -> Result<usize> {
        stop::stop(self.engine()?, &self.store, name).await
    }

    async fn pause(&self, name: &str) -> Result<()> {
        kept::stop(self.engine()?, &self.store, name).await
    }

    async fn resume(&self, name: &str) -> Result<()> {
        kept::start(self.engine()?, &self.store, name).await
    }

    async fn copy_in(&self, name: &str, host: &Path, path: &str) -> Result<()> {
        copy::copy_in(self.engine()?, &kept::container_name(name), host, path).await
    }

    async fn copy_out(&self, name: &str, path: &str, host: &Path) -> Result<()> {
        copy::copy_out(self.engine()?, &kept::container_name(name), path, host).await
    }

    async fn remove(&self, name: &str) -> Result<()> {
        kept::remove(self.engine()?, &self.store, name).await
    }

    async fn status(&self, record: &SandboxRecord) -> Result<Option<String>> {
        Ok(kept::status(self.engine()?, &record.name)
            .await?
            .map(|s| match s {
                // `docker pause` is how a kept sandbox is paused.
                ContainerStateStatusEnum::PAUSED => "paused".to_string(),
                other => other.to_string(),
            }))
    }

    async fn probe(&self) -> Result<Probe> {
        let engine = self.engine()?;
        let detail = engine_status(engine).await?;
        Ok(match crate::pull::small_local_image(engine).await {
            Ok(Some(image)) => Probe::Ready {
                detail,
                trial_image: image,
            },
            Ok(None) => {
                let name = self.flavor.name();
                Probe::Untested {
                    detail,
                    fix: format!(
                        "it has no image to try a sandbox in: `{name} pull alpine` (or `{name} load`), then run doctor again"
                    ),
                }
            }
            Err(e) => Probe::Failed {
                detail,
                why: e.to_string(),
            },
        })
    }

    async fn gc(&self) -> Result<Collected> {
        let engine = self.engine()?;
        engine.ping().await?;
        let c = gc::collect_orphans(engine.clone(), self.store.clone()).await?;
        Ok(Collected {
            containers: gc::confirmed_gone(engine, &c.containers).await + c.pool_containers,
            directories: c.directories,
        })
    }

    async fn expire_when_due(&self, name: &str) -> Result<()> {
        kept::expire_when_due(self.engine()?, &self.store, name).await;
        Ok(())
    }

    async fn build_image(&self, build: &BuildSpec, tag: &str) -> Result<()> {
        crate::build::build(self.engine()?, build, tag).await
    }
}

/// The engine's version and address, and for Podman how agentkernel runs it.
async fn engine_status(engine: &Engine) -> Result<String> {
    let version = engine.ping().await?;
    let mut status = format!("{version} at {}", engine.address);
    if engine.flavor == Flavor::Podman {
        let private = format!("{}/podman.sock", podman::private_dir().display());
        if engine.address.ends_with(&private) {
            status.push_str(&format!(
                " (agentkernel's private `podman system service`, exits after {}s idle",
                podman::SERVICE_IDLE_SECS
            ));
            if let Some(init) = podman::private_service_init_path() {
                status.push_str(&format!("; container init {}", init.display()));
            }
            status.push(')');
        }
        if podman::needs_runc() {
            status.push_str("; hybrid cgroups: containers use runc");
        }
    }
    Ok(status)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
