//! `agentkernel sandbox cp SRC DEST`: copies between the host and a kept
//! sandbox, `NAME:/path` naming the sandbox side (as upstream and `docker cp`
//! write it). Paths in the sandbox are resolved inside it, never on the host:
//! on native through the sandbox's own root (`agentkernel_native::copy`), on
//! Docker/Podman by the engine's archive API, which resolves them in the
//! container. What comes out of a sandbox is untrusted: archive entries are
//! unpacked only beneath the destination, and only files and directories
//! are made.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use agentkernel_core::state::Store;
use agentkernel_core::{names, Error, Result};
use agentkernel_docker::kept::container_name;
use agentkernel_docker::Engine;
use futures_util::TryStreamExt;

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
    let record = store
        .load(&name)?
        .ok_or_else(|| Error::NoSuchSandbox(name.clone()))?;
    if record.backend == "native" {
        let root = agentkernel_native::copy::SandboxRoot::open(store, &name).map_err(native)?;
        if to_sandbox {
            native_in(&root, &host, &path)?;
        } else {
            native_out(&root, &path, &host)?;
        }
    } else {
        let engine = backend::connect_named(&record.backend)?;
        let container = container_name(&name);
        if to_sandbox {
            engine_in(&engine, &container, &host, &path).await?;
        } else {
            engine_out(&engine, &container, &path, &host).await?;
        }
    }
    eprintln!("agentkernel: copied {src} to {dest}");
    Ok(0)
}

fn native(e: std::io::Error) -> Error {
    Error::Backend {
        backend: "native",
        message: e.to_string(),
    }
}

fn host_error(path: &Path, e: std::io::Error) -> Error {
    Error::invalid("host path", path.to_string_lossy(), e.to_string())
}

/// The last component of a path, for copying into a directory.
fn base_name(path: &str) -> Result<&str> {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|b| !b.is_empty() && *b != "." && *b != "..")
        .ok_or_else(|| Error::invalid("cp path", path, "names no file"))
}

fn native_in(root: &agentkernel_native::copy::SandboxRoot, host: &Path, path: &str) -> Result<()> {
    let meta = std::fs::metadata(host).map_err(|e| host_error(host, e))?;
    let target = if path.ends_with('/') || root.is_dir(path) {
        format!(
            "{}/{}",
            path.trim_end_matches('/'),
            base_name(&host.to_string_lossy())?
        )
    } else {
        path.to_string()
    };
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
    if meta.is_dir() {
        let dir = root.create_dir(&target, mode).map_err(native)?;
        let mut skipped = Vec::new();
        agentkernel_native::copy::copy_dir_in(host, &dir, &mut skipped).map_err(native)?;
        return report_skipped(&skipped, "not a file, directory or symlink");
    }
    if !meta.is_file() {
        return Err(Error::invalid(
            "host path",
            host.to_string_lossy(),
            "is not a regular file or directory",
        ));
    }
    let mut from = std::fs::File::open(host).map_err(|e| host_error(host, e))?;
    let mut to = root.create_file(&target, mode).map_err(native)?;
    std::io::copy(&mut from, &mut to).map_err(native)?;
    Ok(())
}

fn native_out(root: &agentkernel_native::copy::SandboxRoot, path: &str, host: &Path) -> Result<()> {
    use agentkernel_native::copy::Source;
    let target = if host.is_dir() {
        host.join(base_name(path)?)
    } else {
        host.to_path_buf()
    };
    match root.source(path).map_err(native)? {
        Source::File(mut from, mode) => {
            let mut to = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&target)
                .map_err(|e| host_error(&target, e))?;
            std::io::copy(&mut from, &mut to).map_err(|e| host_error(&target, e))?;
            Ok(())
        }
        Source::Dir(dir, mode) => {
            let mut skipped = Vec::new();
            agentkernel_native::copy::copy_dir_out(&dir, mode, &target, &mut skipped)
                .map_err(native)?;
            report_skipped(
                &skipped,
                "only files and directories are copied out of a sandbox",
            )
        }
    }
}

/// One notice line per entry a directory copy left out.
fn report_skipped(skipped: &[String], why: &str) -> Result<()> {
    for path in skipped {
        eprintln!("agentkernel: notice: {path} skipped: {why}");
    }
    Ok(())
}

/// A tar of the host path `host` whose single top entry is `entry`.
fn tar_of(host: &Path, entry: &str) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    let meta = std::fs::metadata(host).map_err(|e| host_error(host, e))?;
    let added = if meta.is_dir() {
        builder.append_dir_all(entry, host)
    } else {
        builder.append_path_with_name(host, entry)
    };
    added
        .and_then(|()| builder.into_inner())
        .map_err(|e| host_error(host, e))
}

async fn engine_in(engine: &Engine, container: &str, host: &Path, path: &str) -> Result<()> {
    use bollard::query_parameters::{ContainerArchiveInfoOptions, UploadToContainerOptions};
    let upload = |dir: String, archive: Vec<u8>| {
        engine.docker.upload_to_container(
            container,
            Some(UploadToContainerOptions {
                path: dir,
                no_overwrite_dir_non_dir: Some("true".into()),
                ..Default::default()
            }),
            bollard::body_full(archive.into()),
        )
    };
    // Into PATH when it is a directory there; else as PATH itself (in its
    // parent). Asked first: Podman makes a missing upload path a directory.
    let is_dir = path.ends_with('/')
        || engine
            .docker
            .get_container_archive_info(
                container,
                Some(ContainerArchiveInfoOptions {
                    path: path.to_string(),
                }),
            )
            .await
            .is_ok_and(|stat| stat.file_mode & GO_MODE_DIR != 0);
    let (dir, entry) = if is_dir {
        (
            path.to_string(),
            base_name(&host.to_string_lossy())?.to_string(),
        )
    } else {
        let (parent, _) = path.rsplit_once('/').unwrap_or(("", path));
        let parent = if parent.is_empty() { "/" } else { parent };
        (parent.to_string(), base_name(path)?.to_string())
    };
    upload(dir, tar_of(host, &entry)?)
        .await
        .map_err(|e| engine.error("copying into the sandbox", e))
}

/// Go's `os.ModeDir`, as the engine reports a path's mode.
const GO_MODE_DIR: u32 = 1 << 31;

async fn engine_out(engine: &Engine, container: &str, path: &str, host: &Path) -> Result<()> {
    use bollard::query_parameters::DownloadFromContainerOptions;
    let top = base_name(path)?;
    // The archive is streamed to disk beside the destination (never held in
    // memory: a sandbox decides its size), unpacked there, and the one top
    // entry moved into place (or, into an existing directory, unpacked there).
    let parent = match host.parent() {
        // Only the archive goes there: the entries are unpacked into `host`.
        _ if host.is_dir() => std::env::temp_dir(),
        // The same filesystem as `host`, for the final rename.
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let staging = parent.join(format!(".agentkernel-cp-{}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(|e| host_error(&staging, e))?;
    let result = async {
        let archive_path = staging.join("archive.tar");
        let mut archive =
            std::fs::File::create_new(&archive_path).map_err(|e| host_error(&archive_path, e))?;
        let mut stream = engine.docker.download_from_container(
            container,
            Some(DownloadFromContainerOptions {
                path: path.to_string(),
            }),
        );
        while let Some(chunk) = stream
            .try_next()
            .await
            .map_err(|e| engine.error("copying out of the sandbox", e))?
        {
            std::io::Write::write_all(&mut archive, &chunk)
                .map_err(|e| host_error(&archive_path, e))?;
        }
        let archive =
            std::fs::File::open(&archive_path).map_err(|e| host_error(&archive_path, e))?;
        if host.is_dir() {
            return unpack(archive, host);
        }
        let out = staging.join("out");
        std::fs::create_dir(&out).map_err(|e| host_error(&out, e))?;
        unpack(archive, &out)?;
        std::fs::rename(out.join(top), host).map_err(|e| host_error(host, e))
    }
    .await;
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// Unpacks `archive` beneath `dir`: files and directories only (never
/// symlinks, device nodes, FIFOs or hard links); an entry whose path would
/// leave `dir` fails. A top entry that is a symlink is refused, naming it.
fn unpack(archive: std::fs::File, dir: &Path) -> Result<()> {
    let mut tar = tar::Archive::new(archive);
    tar.set_preserve_permissions(false);
    tar.set_preserve_mtime(true);
    tar.set_unpack_xattrs(false);
    let bad =
        |e: std::io::Error| Error::Conflict(format!("the sandbox's archive is not usable: {e}"));
    let mut first = true;
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let kind = entry.header().entry_type();
        let name = entry
            .path()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        if kind.is_symlink() && first {
            let target = entry
                .link_name()
                .ok()
                .flatten()
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            return Err(Error::Conflict(format!(
                "{name} is a symlink in the sandbox (to {target}); copy the path it points to"
            )));
        }
        if first && !(kind.is_file() || kind.is_dir()) {
            return Err(Error::Conflict(format!(
                "{name} in the sandbox is not a regular file or directory (a FIFO, socket or device); not copied"
            )));
        }
        first = false;
        // A symlink made on the host would point at the host's files (a
        // sandbox's `/tmp/x -> /home/you/.ssh/id_ed25519`): never made.
        if !(kind.is_file() || kind.is_dir()) {
            eprintln!(
                "agentkernel: notice: {name} skipped: only files and directories are copied out of a sandbox"
            );
            continue;
        }
        if !entry.unpack_in(dir).map_err(bad)? {
            return Err(Error::Conflict(format!(
                "the sandbox's archive names {name}, outside the destination; nothing more was copied"
            )));
        }
    }
    Ok(())
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

    #[test]
    fn base_names() {
        assert_eq!(base_name("/a/b/").unwrap(), "b");
        assert_eq!(base_name("file").unwrap(), "file");
        assert!(base_name("/").is_err());
        assert!(base_name("/a/..").is_err());
    }
}
