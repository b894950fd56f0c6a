//! `agentkernel sandbox cp SRC DEST`: copies between the host and a kept
//! sandbox, `NAME:/path` naming the sandbox side (as upstream and `docker cp`
//! write it). Paths in the sandbox are resolved inside it, never on the host:
//! by the backend holding the sandbox (`Backend::copy_in`/`copy_out`): on
//! native through the sandbox's own root (`agentkernel_native::copy`), on
//! Docker/Podman by the engine's archive API (`agentkernel_docker::copy`),
//! which resolves them in the container. What comes out of a sandbox is
//! untrusted: archive entries are unpacked only beneath the destination,
//! and only files and directories are made.

use std::path::PathBuf;

use agentkernel_core::state::Store;
use agentkernel_core::{names, Error, Result};

use crate::backend;

#[derive(Debug, PartialEq, Eq)]
enum Endpoint {
    Host(PathBuf),
    Sandbox { name: String, path: String },
}

/// `NAME:/path` when the part before the first `:` is a sandbox name;
/// anything else is a host path (write `./a:b` for a host file named `a:b`).
fn endpoint(arg: &str) -> Result<Endpoint> {
    match arg.split_once(':') {
        Some((name, path)) if names::validate(name).is_ok() => {
            if !path.starts_with('/') {
                return Err(Error::invalid(
                    "sandbox path",
                    arg,
                    format!("write it absolute, as the sandbox sees it: {name}:/{path}"),
                ));
            }
            Ok(Endpoint::Sandbox {
                name: name.to_string(),
                path: path.to_string(),
            })
        }
        _ if arg.is_empty() => Err(Error::invalid("cp path", arg, "is empty")),
        _ => Ok(Endpoint::Host(PathBuf::from(arg))),
    }
}

pub async fn cp(store: &Store, src: &str, dest: &str) -> Result<i32> {
    let (to_sandbox, host, name, path) = match (endpoint(src)?, endpoint(dest)?) {
        (Endpoint::Host(host), Endpoint::Sandbox { name, path }) => (true, host, name, path),
        (Endpoint::Sandbox { name, path }, Endpoint::Host(host)) => (false, host, name, path),
        (Endpoint::Host(_), Endpoint::Host(_)) => {
            return Err(Error::invalid(
                "cp",
                format!("{src} {dest}"),
                "one side must be in a sandbox: NAME:/path",
            ))
        }
        _ => {
            return Err(Error::invalid(
                "cp",
                format!("{src} {dest}"),
                "copy between two sandboxes through the host (cp A:/x ./x; cp ./x B:/x)",
            ))
        }
    };
    let (backend, _) = backend::holding(store, &name)?;
    if to_sandbox {
        backend.copy_in(&name, &host, &path).await?;
    } else {
        backend.copy_out(&name, &path, &host).await?;
    }
    eprintln!("agentkernel: copied {src} to {dest}");
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            endpoint("My_Box:/tmp/x").unwrap(),
            Endpoint::Sandbox {
                name: "My_Box".into(),
                path: "/tmp/x".into()
            }
        );
        assert_eq!(
            endpoint("./a:b").unwrap(),
            Endpoint::Host(PathBuf::from("./a:b"))
        );
        assert_eq!(
            endpoint("/tmp/file").unwrap(),
            Endpoint::Host(PathBuf::from("/tmp/file"))
        );
        assert!(endpoint("box:relative").is_err());
        assert!(endpoint("").is_err());
    }
}
