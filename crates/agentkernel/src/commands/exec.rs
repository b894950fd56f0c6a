//! `agentkernel exec NAME -- CMD`: run in a kept sandbox.

use agentkernel_core::spec::ExecRequest;
use agentkernel_core::state::Store;
use agentkernel_core::{names, parse, Result};

use crate::cli::ExecArgs;

pub async fn exec(args: ExecArgs) -> Result<i32> {
    agentkernel_docker::stdio::install_signal_handlers();
    names::validate(&args.name)?;
    let env = args
        .env
        .iter()
        .map(|e| parse::env_pair(e))
        .collect::<Result<Vec<_>>>()?;
    let timeout = args
        .timeout
        .as_deref()
        .map(|t| parse::duration("--timeout", t))
        .transpose()?;
    if let Some(w) = &args.workdir {
        if !w.starts_with('/') {
            return Err(agentkernel_core::Error::invalid(
                "--workdir",
                w,
                "must be an absolute path",
            ));
        }
    }
    let req = ExecRequest {
        argv: super::utf8_command(args.command)?,
        env,
        workdir: args.workdir,
        tty: super::wants_tty() && !args.detach,
        timeout,
        user: args.sudo.then(|| "0:0".to_string()),
    };
    let store = Store::open_default();
    let (backend, record) = crate::backend::holding(&store, &args.name)?;
    super::sandbox_lifecycle::refuse_if_stopped(&store, &args.name)?;
    if args.detach {
        if args.receipt.is_some() {
            return Err(agentkernel_core::Error::invalid(
                "--receipt",
                "with --detach",
                "a receipt needs the command's end, which --detach does not wait for; drop one of them",
            ));
        }
        return super::exec_detach::detach(&args.name, &req);
    }
    let Some(path) = args.receipt else {
        return run_in(backend.as_ref(), &record, &req).await;
    };
    let request = crate::receipt::Request {
        path,
        dsse: args.receipt_format.as_deref() == Some("dsse"),
    };
    let invocation = crate::receipt::Invocation::for_exec(&store, &record, &req);
    let recording = crate::receipt::Recording::start(request, invocation);
    let result = run_in(backend.as_ref(), &record, &req).await;
    recording.finish(result)
}

async fn run_in(
    backend: &dyn agentkernel_core::backend::Backend,
    record: &agentkernel_core::state::SandboxRecord,
    req: &ExecRequest,
) -> Result<i32> {
    // Native never returns on success unless a receipt observes it: the
    // process becomes the helper.
    let outcome = backend.exec(record, req).await?;
    Ok(super::finish(outcome, record.memory_bytes, req.timeout))
}
