//! `sandbox cp` on a kept Docker/Podman sandbox, by the engine's archive
//! API, which resolves paths in the container. What comes out of a sandbox
//! is untrusted: archive entries are unpacked only beneath the destination,
//! and only files and directories are made.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use agentkernel_core::copy::{base_name, host_error};
use agentkernel_core::{Error, Result};
use futures_util::TryStreamExt;

use crate::Engine;

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

/// Unpacks `archive` at the container directory `dir`, by the engine,
/// which resolves `dir` and every entry inside the container's root and
/// never replaces a directory with a file.
async fn upload(
    engine: &Engine,
    container: &str,
    dir: String,
    archive: Vec<u8>,
) -> std::result::Result<(), bollard::errors::Error> {
    use bollard::query_parameters::UploadToContainerOptions;
    engine
        .docker
        .upload_to_container(
            container,
            Some(UploadToContainerOptions {
                path: dir,
                no_overwrite_dir_non_dir: Some("true".into()),
                ..Default::default()
            }),
            bollard::body_full(archive.into()),
        )
        .await
}

/// `[[files]]`, into a container whose first command has not run (created,
/// or running its keep-alive): one archive entry per file, at its path under `/`,
/// owned by root with exactly its mode. The engine makes missing parent
/// directories (0755) and resolves the path inside the container's root.
pub async fn put_files(
    engine: &Engine,
    container: &str,
    files: &[agentkernel_core::files::InjectedFile],
) -> Result<()> {
    for file in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(file.content.len() as u64);
        header.set_mode(file.mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        );
        header.set_entry_type(tar::EntryType::Regular);
        let mut builder = tar::Builder::new(Vec::new());
        let entry = file.dest.trim_start_matches('/');
        let archive = builder
            .append_data(&mut header, entry, file.content.as_slice())
            .and_then(|()| builder.into_inner())
            .map_err(|e| Error::Conflict(format!("[[files]] {}: {e}", file.dest)))?;
        upload(engine, container, "/".into(), archive)
            .await
            .map_err(|e| {
                let why = crate::engine::message_of(&e);
                let hint = if why.to_ascii_lowercase().contains("read-only") {
                    "the restrictive profile's root and workspace are read-only (and on Docker /tmp cannot be written from outside): choose another dest or profile, or mount it with -v HOST:PATH:ro"
                } else {
                    "check that its directory is not a file in the image"
                };
                Error::Conflict(format!(
                    "[[files]] {}: the {} engine could not write it ({why}); {hint}",
                    file.dest,
                    engine.flavor.name()
                ))
            })?;
    }
    Ok(())
}

pub async fn copy_in(engine: &Engine, container: &str, host: &Path, path: &str) -> Result<()> {
    use bollard::query_parameters::ContainerArchiveInfoOptions;
    let upload = |dir: String, archive: Vec<u8>| upload(engine, container, dir, archive);
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

pub async fn copy_out(engine: &Engine, container: &str, path: &str, host: &Path) -> Result<()> {
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
