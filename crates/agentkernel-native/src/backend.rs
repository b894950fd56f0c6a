//! The native runtime behind the [`Backend`] interface: what it can enforce
//! here (everything as root; pids only, no published ports and no disk cap
//! on the copy-on-write workspace when rootless), and each operation mapped
//! to the helper (`helper.rs`), the holder of kept sandboxes (`kept.rs`) or
//! `join.rs`.

use std::path::Path;
use std::time::Duration;

use agentkernel_core::backend::{
    Backend, BackendKind, Capabilities, Collected, Probe, RunOptions, Support,
};
use agentkernel_core::spec::{ExecRequest, Outcome, SandboxSpec};
use agentkernel_core::state::{SandboxRecord, Store};
use agentkernel_core::{Error, Result};

use crate::plan::SecretFile;
use crate::{copy, egress, gc, helper, images, kept, pool, prepare, rootless};

pub struct NativeBackend {
    store: Store,
}

impl NativeBackend {
    /// The native backend over this state store. Whether this machine can
    /// run new sandboxes is `host::check` (asked when a run chooses it, and
    /// by `probe`); existing ones can always be listed, stopped and removed.
    pub fn new(store: Store) -> NativeBackend {
        NativeBackend { store }
    }

    /// For `--branch`: the sandbox's record, waiting for a concurrent
    /// creator that holds the name but has not committed yet.
    async fn existing(&self, name: &str) -> Result<Option<SandboxRecord>> {
        for _ in 0..100 {
            if let Some(record) = self.store.load(name)? {
                return Ok(Some(record));
            }
            if !self.store.sandbox_dir(name).exists() {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(None)
    }
}

fn backend_error(e: crate::error::KeptError) -> Error {
    crate::Error::from(e).into()
}

#[async_trait::async_trait(?Send)]
impl Backend for NativeBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Native
    }

    fn capabilities(&self) -> Capabilities {
        let native = Capabilities {
            // Published ports are relayed over IPv4 only.
            ipv6_ports: Support::no(
                "on the native backend",
                "use an IPv4 address such as 127.0.0.1 or 0.0.0.0",
            ),
            // As root; opt-in (`--fast`, see `run.rs` of the CLI and pool.rs).
            warm_pool: true,
            ..Capabilities::all()
        };
        if rootless::UserMap::for_caller().is_none() {
            return native;
        }
        let other_backend = "run agentkernel as root, or use -B podman / -B docker";
        let no_cgroups = Support::no(
            "on a rootless native sandbox (no cgroup delegation here)",
            other_backend,
        );
        Capabilities {
            memory_limit: no_cgroups.clone(),
            cpu_limit: no_cgroups,
            disk_cap_workspace: Support::no(
                "of a rootless native sandbox (the cap needs a loop-mounted filesystem)",
                "run agentkernel as root, or use --profile restrictive (read-only workspace)",
            ),
            published_ports: Support::no("from a rootless native sandbox", other_backend),
            network: match crate::slirp::usable() {
                Ok(_) => Support::Yes,
                Err(why) => Support::no(
                    format!("for a rootless native sandbox here: {why}"),
                    "or pass --no-network",
                ),
            },
            rootless: true,
            // A rootless sandbox is entered through its anchor process
            // (kept.rs): not pooled, a rootless run builds its own.
            warm_pool: false,
            ..native
        }
    }

    async fn run(&self, spec: &SandboxSpec, options: &RunOptions<'_>) -> Result<Outcome> {
        if let Some(keep) = spec.keep.as_ref().filter(|k| k.reuse) {
            if let Some(record) = self.existing(&keep.name).await? {
                if record.backend != BackendKind::Native {
                    return Err(Error::Conflict(format!(
                        "sandbox {} exists on the {} backend; use -B {} to reuse it, or remove it first",
                        keep.name, record.backend, record.backend
                    )));
                }
                egress::refuse_on_reuse(spec, &keep.name)?;
                let command =
                    helper::exec_in(&self.store, &keep.name, &spec.exec, Some(keep.ttl), true);
                let code = egress::observing_kept(&self.store, &keep.name, command).await?;
                return Ok(Outcome::Exited(code));
            }
        }
        let image = images::image_root(spec, options.config).await?;
        if options.warm_pool {
            let settings = pool::Settings::from_config(options.config);
            if let Some(plan) = pool::claim_for_run(&self.store, spec, &image, settings)? {
                if let Some(notice) = &options.notice {
                    eprintln!("{notice}");
                }
                return helper::exec_helper(&plan).await.map(Outcome::Exited);
            }
        }
        let (mut plan, claim) = prepare::plan(spec, &image, &self.store)?;
        plan.secret_files = SecretFile::all(&options.secret_files);
        plan.files = options.files.clone();
        if let Some(notice) = &options.notice {
            eprintln!("{notice}");
        }
        let mut final_report = None;
        if let Some(spec_egress) = spec.egress.as_ref().filter(|e| e.needs_proxy()) {
            // Last, just before the helper: nothing after it can fail but the
            // exec, and the proxy ends with this process if that fails.
            let reports = egress::Reports {
                socket: spec
                    .keep
                    .as_ref()
                    .map(|k| egress::report_socket(&self.store, &k.name)),
                final_report: spec.keep.is_none() && agentkernel_core::observe::enabled(),
            };
            let mut started = egress::start(spec_egress, options.secrets, reports)?;
            final_report = started.final_report.take();
            plan.egress = Some(started.into_plan().map_err(|e| Error::Backend {
                backend: "egress proxy",
                message: e.to_string(),
            })?);
        }
        // On success the process becomes the helper, which exits with the
        // command's code (or, observed, the helper was our child and now
        // owns the name and scratch); on failure `claim` releases them.
        let code = helper::exec_helper(&plan).await?;
        claim.hand_over();
        // Observed (a receipt): the helper was our child and has ended.
        if let Some(plan_egress) = &plan.egress {
            plan_egress.close_ours();
            let report = match (final_report, &spec.keep) {
                (Some(pipe), _) => {
                    tokio::task::spawn_blocking(move || egress::read_final_report(pipe)).await
                }
                (None, Some(keep)) => {
                    let socket = egress::report_socket(&self.store, &keep.name);
                    tokio::task::spawn_blocking(move || {
                        agentkernel_egress::summary::request_report(&socket)
                    })
                    .await
                }
                (None, None) => Ok(None),
            };
            agentkernel_core::observe::egress(egress::report_json(report.ok().flatten()));
        }
        Ok(Outcome::Exited(code))
    }

    async fn exec(&self, record: &SandboxRecord, request: &ExecRequest) -> Result<Outcome> {
        let command = helper::exec_in(&self.store, &record.name, request, None, false);
        let code = egress::observing_kept(&self.store, &record.name, command).await?;
        Ok(Outcome::Exited(code))
    }

    async fn create(
        &self,
        spec: &SandboxSpec,
        options: &RunOptions<'_>,
        reserved: &dyn Fn() -> Result<()>,
    ) -> Result<()> {
        let image = images::image_root(spec, options.config).await?;
        let (mut plan, claim) = prepare::plan(spec, &image, &self.store)?;
        // No first command: the helper creates the sandbox (copies its
        // files in, runs its template's setup) and exits.
        plan.argv.clear();
        plan.files = options.files.clone();
        // On failure `claim` releases the name and scratch.
        reserved()?;
        if let Some(notice) = &options.notice {
            eprintln!("{notice}");
        }
        helper::exec_helper(&plan).await?;
        claim.hand_over();
        Ok(())
    }

    async fn stop(&self, name: &str) -> Result<usize> {
        crate::stop::stop(&self.store, name).map_err(|e| crate::Error::from(e).into())
    }

    async fn pause(&self, name: &str) -> Result<()> {
        kept::set_stopped(&self.store, name, true).map_err(backend_error)
    }

    async fn resume(&self, name: &str) -> Result<()> {
        kept::set_stopped(&self.store, name, false).map_err(backend_error)
    }

    async fn copy_in(&self, name: &str, host: &Path, path: &str) -> Result<()> {
        copy::copy_in(&self.store, name, host, path)
    }

    async fn copy_out(&self, name: &str, path: &str, host: &Path) -> Result<()> {
        copy::copy_out(&self.store, name, path, host)
    }

    fn set_ttl(&self, name: &str, ttl: Duration) -> Result<()> {
        // Each command in the sandbox takes its TTL from the sandbox's plan.
        let path = kept::plan_file(&self.store, name);
        let data = std::fs::read(&path).map_err(|e| Error::state(&path, e))?;
        let mut plan: crate::Plan = serde_json::from_slice(&data)
            .map_err(|e| Error::state(&path, std::io::Error::other(e)))?;
        if let Some(keep) = plan.keep.as_mut() {
            keep.ttl = ttl;
        }
        let data = serde_json::to_vec(&plan).expect("plan serializes");
        agentkernel_core::state::write_atomic(&path, &data)
    }

    async fn remove(&self, name: &str) -> Result<()> {
        kept::remove(&self.store, name).map_err(backend_error)
    }

    async fn status(&self, record: &SandboxRecord) -> Result<Option<String>> {
        // The holder reports a frozen sandbox as "stopped": here it is paused.
        Ok(kept::status(&self.store, &record.name).map(|s| match s {
            "stopped" => "paused".to_string(),
            other => other.to_string(),
        }))
    }

    async fn probe(&self) -> Result<Probe> {
        let found = crate::host::check().map_err(|why| Error::BackendUnavailable {
            backend: "native".into(),
            why: why.to_string(),
            // doctor is what the usual fix points to: say nothing more.
            fix: String::new(),
        })?;
        Ok(Probe::Ready {
            detail: format!("Linux {} ({}), no daemon", found.kernel, found.detail),
            trial_image: prepare::HOST_IMAGE.to_string(),
        })
    }

    async fn gc(&self) -> Result<Collected> {
        Ok(Collected {
            containers: 0,
            directories: gc::orphaned_runs(&self.store)
                + kept::collect(&self.store)
                + pool::collect(&self.store),
        })
    }
}
