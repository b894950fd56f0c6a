//! Kept sandboxes on `-B qemu` (`run --keep`, `sandbox create`, `exec`):
//! the VM stays up under a holder process (`agentkernel_vm::kept`) and each
//! command is one more conversation with its guest agent.

use std::time::Duration;

use agentkernel_core::backend::{BackendKind, RunOptions};
use agentkernel_core::secrets::SecretFile;
use agentkernel_core::spec::{kept_message, ExecRequest, Outcome, SandboxSpec};
use agentkernel_core::state::{SandboxRecord, Store};
use agentkernel_core::{Error, Result};
use agentkernel_vm::kept::{self, KeptVm};
use agentkernel_vm::protocol::RunRequest;

use super::qemu::{backend_error, outcome, prepare, with_terminal};

/// `run --keep` (and `--branch`, reusing the sandbox when it exists): the
/// kept VM, then its first command.
pub async fn run(store: &Store, spec: &SandboxSpec, options: &RunOptions<'_>) -> Result<Outcome> {
    let keep = spec.keep.as_ref().expect("a kept run");
    if keep.reuse {
        if let Some(record) = existing(store, &keep.name).await? {
            if record.backend != BackendKind::Qemu {
                return Err(Error::Conflict(format!(
                    "sandbox {} exists on the {} backend; use -B {} to reuse it, or remove it first",
                    keep.name, record.backend, record.backend
                )));
            }
            agentkernel_native::egress::refuse_on_reuse(spec, &keep.name)?;
            let command = async { exec(store, &keep.name, &spec.exec) };
            let outcome =
                agentkernel_native::egress::observing_kept(store, &keep.name, command).await;
            eprintln!("{}", kept_message(&keep.name, keep.ttl, true));
            return outcome;
        }
    }
    let first = create(store, spec, options, &|| Ok(())).await?;
    let first = with_terminal(first, spec.exec.tty);
    // With --receipt and a proxy, the command's traffic goes into it.
    let command = async { kept::exec(store, &keep.name, first).map_err(backend_error) };
    let ended = agentkernel_native::egress::observing_kept(store, &keep.name, command).await;
    eprintln!("{}", kept_message(&keep.name, keep.ttl, false));
    Ok(outcome(ended?))
}

/// For `--branch`: the sandbox's record, waiting for a concurrent creator
/// that holds the name but has not committed yet (a VM boots in seconds).
async fn existing(store: &Store, name: &str) -> Result<Option<SandboxRecord>> {
    for _ in 0..600 {
        if let Some(record) = store.load(name)? {
            return Ok(Some(record));
        }
        if !store.sandbox_dir(name).exists() {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(None)
}

/// Reserves the name, boots the kept VM under its holder and runs the
/// template's setup; returns the request of the spec's own command. On any
/// failure nothing is left.
pub async fn create(
    store: &Store,
    spec: &SandboxSpec,
    options: &RunOptions<'_>,
    reserved: &dyn Fn() -> Result<()>,
) -> Result<RunRequest> {
    let keep = spec.keep.as_ref().expect("a kept sandbox");
    store.reserve(&keep.name)?;
    let built = async {
        reserved()?;
        // The files are written once, when the agent builds the sandbox.
        let (host, mut vm, mut request) = prepare(spec, options.config, &options.files).await?;
        // The proxy, as for a one-shot run, held by the VM's holder: it
        // serves every command and ends with the sandbox. Started last, so
        // nothing fails after it but the holder (whose end ends it).
        let egress = match super::qemu::proxied(spec) {
            Some(egress) => {
                let reports = agentkernel_native::egress::Reports {
                    socket: Some(agentkernel_native::egress::report_socket(store, &keep.name)),
                    final_report: false,
                };
                let proxy = agentkernel_native::egress::start(egress, options.secrets, reports)?;
                agentkernel_native::egress::expect_connections(&proxy.handoff).map_err(|e| {
                    Error::Backend {
                        backend: "egress proxy",
                        message: format!("cannot reach it: {e}"),
                    }
                })?;
                super::qemu::with_proxy(&mut vm, &mut request, egress, &proxy.ca_pem);
                Some(kept::Egress {
                    handoff: proxy.handoff,
                    lifeline: proxy.lifeline,
                })
            }
            None => None,
        };
        let record = SandboxRecord::for_kept(spec, BackendKind::Qemu, String::new());
        let described = KeptVm {
            qemu: host.qemu.binary.clone(),
            vm,
            sandbox: request.clone(),
            record: Some(record),
        };
        let secret_files = SecretFile::all(&options.secret_files);
        kept::create(store, &keep.name, &described, egress, &secret_files)
            .map_err(backend_error)?;
        Ok(RunRequest {
            files: Vec::new(),
            ..request
        })
    }
    .await;
    let request = match built {
        Ok(request) => request,
        Err(e) => {
            let _ = store.forget(&keep.name);
            return Err(e);
        }
    };
    if !keep.setup.is_empty() {
        let setup = ExecRequest {
            argv: agentkernel_core::template::setup_argv(&keep.setup),
            tty: false,
            ..spec.exec.clone()
        };
        let code = match exec(store, &keep.name, &setup) {
            Ok(outcome) => outcome.exit_code(),
            Err(e) => {
                let _ = kept::remove(store, &keep.name);
                return Err(e);
            }
        };
        if code != 0 {
            let _ = kept::remove(store, &keep.name);
            return Err(Error::Conflict(agentkernel_core::template::setup_failed(
                &keep.name, code,
            )));
        }
    }
    Ok(request)
}

/// One more command in the kept VM: the sandbox's environment, working
/// directory and user unless the request names its own.
pub fn exec(store: &Store, name: &str, request: &ExecRequest) -> Result<Outcome> {
    let base = RunRequest {
        // Written when the sandbox was built; not sent again.
        files: Vec::new(),
        ..kept::sandbox_request(store, name).map_err(|_| gone(name))?
    };
    let mut env = base.env.clone();
    env.extend(request.env.iter().map(|(k, v)| format!("{k}={v}")));
    let command = RunRequest {
        argv: request.argv.clone(),
        env,
        workdir: request.workdir.clone().unwrap_or(base.workdir.clone()),
        user: request.user.clone().or(base.user.clone()),
        timeout_ms: request.timeout.map(|t| t.as_millis() as u64),
        ..base
    };
    let command = with_terminal(command, request.tty);
    let ended = kept::exec(store, name, command).map_err(backend_error)?;
    Ok(outcome(ended))
}

fn gone(name: &str) -> Error {
    Error::NoSuchSandbox(format!("{name} (it expired or was removed)"))
}
