//! The native runtime behind the [`Backend`] interface: what it can enforce
//! here (everything as root; pids only, no published ports and no disk cap
//! on the copy-on-write workspace when rootless), and each operation mapped
//! to the helper (`helper.rs`), the holder of kept sandboxes (`kept.rs`) or
//! `join.rs`.

use std::time::Duration;

use agentkernel_core::backend::{
    Backend, BackendKind, Capabilities, Collected, Probe, RunOptions, Support,
};
use agentkernel_core::spec::{ExecRequest, Outcome, SandboxSpec};
use agentkernel_core::state::{SandboxRecord, Store};
use agentkernel_core::{Error, Result};

use crate::{gc, helper, images, kept, prepare, rootless};

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
            egress_proxy: Support::no("on the native backend", "leave the secrets out for now"),
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
                let e = helper::exec_in(&self.store, &keep.name, &spec.exec, Some(keep.ttl), true);
                return Err(e);
            }
        }
        let image = images::image_root(spec, options.config).await?;
        let (plan, _claim) = prepare::plan(spec, &image, &self.store)?;
        if let Some(notice) = &options.notice {
            eprintln!("{notice}");
        }
        // On success the process becomes the helper, which exits with the
        // command's code; on failure `_claim` releases the name and scratch.
        Err(crate::Error::from(helper::exec_helper(&plan)).into())
    }

    async fn exec(&self, record: &SandboxRecord, request: &ExecRequest) -> Result<Outcome> {
        Err(helper::exec_in(
            &self.store,
            &record.name,
            request,
            None,
            false,
        ))
    }

    async fn stop(&self, name: &str) -> Result<()> {
        kept::set_stopped(&self.store, name, true).map_err(backend_error)
    }

    async fn start(&self, name: &str) -> Result<()> {
        kept::set_stopped(&self.store, name, false).map_err(backend_error)
    }

    async fn remove(&self, name: &str) -> Result<()> {
        kept::remove(&self.store, name).map_err(backend_error)
    }

    async fn status(&self, record: &SandboxRecord) -> Result<Option<String>> {
        Ok(kept::status(&self.store, &record.name).map(str::to_string))
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
            directories: gc::orphaned_runs(&self.store) + kept::collect(&self.store),
        })
    }
}
