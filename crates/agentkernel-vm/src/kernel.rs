//! The guest kernel. Unless the user chose one (`[qemu] kernel`, with or
//! without a modules directory): agentkernel's own, when
//! `scripts/guest-kernel.sh` has built it into [`OWN_KERNEL_DIR`], else the
//! newest `/boot/vmlinuz-*` whose modules are installed (Debian's
//! `linux-image-amd64` provides both).

use std::path::{Path, PathBuf};

use crate::{fail, Result};

/// Where `scripts/guest-kernel.sh` puts the kernel it builds for the guest
/// (`vmlinux`, with everything the agent needs built in). Under TCG it
/// boots in about a third of the distribution kernel's time, which is what
/// brings a cold VM under the 1.5 s target (docs/qemu.md).
pub const OWN_KERNEL_DIR: &str = "/usr/local/lib/agentkernel/guest-kernel";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `[qemu] kernel` or `$AGENTKERNEL_QEMU_KERNEL`.
    Chosen,
    /// agentkernel's own, from `scripts/guest-kernel.sh`.
    Own,
    /// The distribution's, from `/boot`.
    Distribution,
}

#[derive(Debug, Clone)]
pub struct Kernel {
    pub image: PathBuf,
    /// Names this kernel in the caches (its initramfs, its vmlinux): a
    /// release for Debian's, an identity of the files for another.
    pub version: String,
    /// `/lib/modules/VERSION`; `None`: the kernel has what the agent needs
    /// built in, and the initramfs carries no modules.
    pub modules: Option<PathBuf>,
    pub origin: Origin,
}

impl Kernel {
    /// For `doctor`: which kernel, and why this one.
    pub fn describe(&self) -> String {
        match self.origin {
            Origin::Chosen => format!(
                "{} (chosen by qemu.kernel or AGENTKERNEL_QEMU_KERNEL)",
                self.image.display()
            ),
            Origin::Own => format!(
                "{} (agentkernel's, built by scripts/guest-kernel.sh)",
                self.image.display()
            ),
            Origin::Distribution => format!(
                "{} (the distribution's; scripts/guest-kernel.sh builds one that boots about 3x faster under TCG)",
                self.version
            ),
        }
    }
}

pub fn find() -> Result<Kernel> {
    match own(Path::new(OWN_KERNEL_DIR))? {
        Some(kernel) => Ok(kernel),
        None => find_in(Path::new("/boot"), Path::new("/lib/modules")),
    }
}

/// agentkernel's own kernel, `DIR/vmlinux`, if it was built. Nobody names
/// it: it is picked because it is there, so it must be a file only root
/// (or the user running agentkernel) could have put there: a kernel
/// another local user could plant would be booted as the sandbox's own.
/// One that is there but fails that is refused, not skipped (fail closed).
fn own(dir: &Path) -> Result<Option<Kernel>> {
    let image = dir.join("vmlinux");
    let meta = match std::fs::symlink_metadata(&image) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return fail(format!(
                "agentkernel's guest kernel {} cannot be read: {e}; fix its permissions, or remove it to boot the distribution's kernel",
                image.display()
            ))
        }
        Ok(meta) if !meta.is_file() => {
            return fail(format!(
                "agentkernel's guest kernel {} is not a regular file; rebuild it with scripts/guest-kernel.sh, or remove it to boot the distribution's kernel",
                image.display()
            ))
        }
        Ok(meta) => meta,
    };
    if let Some(why) = untrusted(&image) {
        return fail(format!(
            "agentkernel's guest kernel {} is refused: {why}; make it root's and not writable by others (chown root:root, chmod go-w), or remove it to boot the distribution's kernel",
            image.display()
        ));
    }
    Ok(Some(Kernel {
        version: format!("own-{}", files_id(&[(&image, &meta)])),
        image,
        modules: None,
        origin: Origin::Own,
    }))
}

/// The identity of a kernel's files (each one's path, device, inode, size
/// and mtime), short: rebuilding a kernel in place gives another.
fn files_id(files: &[(&Path, &std::fs::Metadata)]) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for (path, meta) in files {
        hash.update(path.as_os_str().as_encoded_bytes());
        crate::hash_identity(&mut hash, meta);
    }
    crate::short_key(hash, 6)
}

/// Why `path` could have been written by someone other than root or this
/// user: it or a directory above it owned by another user, or writable by
/// group or others (a directory with the sticky bit, like /tmp, only lets
/// its entries' owners replace them, so it does not count).
fn untrusted(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no failure mode.
    let me = unsafe { libc::geteuid() };
    for (depth, p) in path.ancestors().enumerate() {
        if p.as_os_str().is_empty() {
            continue;
        }
        let Ok(meta) = std::fs::metadata(p) else {
            return Some(format!("{} cannot be read", p.display()));
        };
        if meta.uid() != 0 && meta.uid() != me {
            return Some(format!("{} is owned by uid {}", p.display(), meta.uid()));
        }
        let sticky_dir = depth > 0 && meta.mode() & 0o1000 != 0;
        if meta.mode() & 0o022 != 0 && !sticky_dir {
            return Some(format!(
                "{} is writable by others (mode {:o})",
                p.display(),
                meta.mode() & 0o7777
            ));
        }
    }
    None
}

fn find_in(boot: &Path, modules: &Path) -> Result<Kernel> {
    let mut versions: Vec<String> = std::fs::read_dir(boot)
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_prefix("vmlinuz-").map(str::to_owned)
                })
                .filter(|v| modules.join(v).join("modules.dep").is_file())
                .collect()
        })
        .unwrap_or_default();
    versions.sort_by_key(|v| version_key(v));
    let Some(version) = versions.pop() else {
        return fail(format!(
            "no guest kernel: no {}/vmlinuz-* with modules in {}; install one (Debian: apt-get install linux-image-amd64)",
            boot.display(),
            modules.display()
        ));
    };
    Ok(Kernel {
        image: boot.join(format!("vmlinuz-{version}")),
        modules: Some(modules.join(&version)),
        version,
        origin: Origin::Distribution,
    })
}

/// The kernel the user chose: `image` (a bzImage, or an ELF vmlinux, which
/// QEMU boots through its PVH entry without decompressing anything) and,
/// when its drivers are modules, their directory. Its `version` is the
/// files' identity (path, size, mtime), so that rebuilding the kernel in
/// place makes a new initramfs.
pub fn chosen(image: &Path, modules: Option<&Path>) -> Result<Kernel> {
    let meta = std::fs::metadata(image)
        .and_then(|m| {
            if m.is_file() {
                Ok(m)
            } else {
                Err(std::io::Error::other("not a file"))
            }
        })
        .or_else(|e| {
            fail(format!(
                "the guest kernel {} (qemu.kernel) cannot be used: {e}; fix [qemu] kernel in the config, or remove it to boot Debian's kernel",
                image.display()
            ))
        })?;
    let index = modules.map(|dir| dir.join("modules.dep"));
    let index_meta = match &index {
        Some(index) => Some(std::fs::metadata(index).or_else(|e| {
            fail(format!(
                "the guest kernel's modules (qemu.modules) cannot be used: {}: {e}; name a /lib/modules/VERSION directory (run depmod for it), or remove qemu.modules if the drivers are built in",
                index.display()
            ))
        })?),
        None => None,
    };
    let mut files = vec![(image, &meta)];
    if let (Some(index), Some(index_meta)) = (&index, &index_meta) {
        files.push((index.as_path(), index_meta));
    }
    Ok(Kernel {
        image: image.to_path_buf(),
        version: format!("chosen-{}", files_id(&files)),
        modules: modules.map(Path::to_path_buf),
        origin: Origin::Chosen,
    })
}

/// `6.1.0-57-amd64` sorts by its numbers, like `sort -V`.
fn version_key(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// The kernel as an uncompressed ELF with a PVH entry, cached in
/// `cache_dir`, when it can be made: QEMU then jumps straight into it
/// instead of running the bzImage's real-mode set-up and decompressor,
/// which under TCG is most of a boot (here: 3.3 s to the kernel's panic
/// instead of 6 s). `None` (boot the bzImage) when the kernel has no PVH
/// entry (`CONFIG_PVH`) or its payload cannot be decompressed here.
/// A chosen kernel that is already an ELF is booted as it is.
pub fn uncompressed(cache_dir: &Path, kernel: &Kernel) -> Option<PathBuf> {
    if is_elf(&kernel.image) {
        return Some(kernel.image.clone());
    }
    let path = cache_dir.join(format!("vmlinux-{}", kernel.version));
    if path.is_file() {
        return Some(path);
    }
    // Debian keeps `config-RELEASE` beside `vmlinuz-RELEASE`: found by the
    // image's own name, so a Debian kernel named in qemu.kernel is
    // decompressed too.
    let release = kernel
        .image
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or(&kernel.version);
    let config = kernel.image.with_file_name(format!("config-{release}"));
    let config = std::fs::read_to_string(config).ok()?;
    if !config.lines().any(|l| l == "CONFIG_PVH=y") {
        return None;
    }
    let image = std::fs::read(&kernel.image).ok()?;
    // The payload's format, by its magic, and the tool that unpacks one
    // stream of it (the bzImage has more after the payload).
    let formats: [(&[u8], &[&str]); 3] = [
        (b"\xfd7zXZ\x00", &["xz", "-dc", "--single-stream"]),
        (b"\x28\xb5\x2f\xfd", &["zstd", "-dcq"]),
        (b"\x1f\x8b\x08", &["gzip", "-dc"]),
    ];
    let (offset, tool) = formats.iter().find_map(|(magic, tool)| {
        image
            .windows(magic.len())
            .position(|w| w == *magic)
            .map(|at| (at, *tool))
    })?;
    let _ = std::fs::create_dir_all(cache_dir);
    let tmp = cache_dir.join(format!(
        ".vmlinux-{}.{}",
        kernel.version,
        std::process::id()
    ));
    let made = decompress(tool, &image[offset..], &tmp)
        .filter(|()| is_elf(&tmp))
        .and_then(|()| std::fs::rename(&tmp, &path).ok());
    let _ = std::fs::remove_file(&tmp);
    made.map(|()| path)
}

fn decompress(tool: &[&str], data: &[u8], out: &Path) -> Option<()> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(tool[0])
        .args(&tool[1..])
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(out).ok()?)
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    // gzip and zstd complain about the bytes after their stream; the
    // output is whole all the same, and checked as ELF below.
    let _ = child.stdin.take()?.write_all(data);
    let _ = child.wait();
    Some(())
}

fn is_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_kernel_with_modules_wins() {
        let dir = tempfile::tempdir().unwrap();
        let (boot, mods) = (dir.path().join("boot"), dir.path().join("mods"));
        for v in ["6.1.0-9-amd64", "6.1.0-57-amd64", "6.2.0-1-amd64"] {
            std::fs::create_dir_all(&boot).unwrap();
            std::fs::write(boot.join(format!("vmlinuz-{v}")), "").unwrap();
        }
        for v in ["6.1.0-9-amd64", "6.1.0-57-amd64"] {
            std::fs::create_dir_all(mods.join(v)).unwrap();
            std::fs::write(mods.join(v).join("modules.dep"), "").unwrap();
        }
        assert_eq!(find_in(&boot, &mods).unwrap().version, "6.1.0-57-amd64");
        assert!(find_in(&dir.path().join("none"), &mods).is_err());
    }

    #[test]
    fn agentkernels_own_kernel_is_used_only_when_no_one_else_could_have_put_it_there() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let own_dir = dir.path().join("guest-kernel");
        std::fs::create_dir(&own_dir).unwrap();
        std::fs::set_permissions(&own_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(own(&own_dir).unwrap().is_none(), "not built: not used");
        let image = own_dir.join("vmlinux");
        std::fs::write(&image, "\x7fELF").unwrap();
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o644)).unwrap();
        let k = own(&own_dir).unwrap().expect("built: used");
        assert_eq!(k.origin, Origin::Own);
        assert!(k.version.starts_with("own-") && k.modules.is_none());
        assert!(k.describe().contains("guest-kernel.sh"), "{}", k.describe());
        // Writable by others: another user could have replaced it.
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = own(&own_dir).unwrap_err().0;
        assert!(e.contains("writable by others") && !e.contains('\n'), "{e}");
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&own_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = own(&own_dir).unwrap_err().0;
        assert!(e.contains("writable by others"), "{e}");
        std::fs::set_permissions(&own_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Owned by another user, who could rewrite it at will (run as
        // root, as the test command does: only root can give a file away).
        // SAFETY: geteuid has no failure mode.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&image, Some(65534), None).unwrap();
            let e = own(&own_dir).unwrap_err().0;
            assert!(e.contains("owned by uid 65534"), "{e}");
            std::os::unix::fs::chown(&image, Some(0), None).unwrap();
        }
        // A symlink could point anywhere: refused, not followed.
        std::fs::rename(&image, own_dir.join("real")).unwrap();
        std::os::unix::fs::symlink(own_dir.join("real"), &image).unwrap();
        let e = own(&own_dir).unwrap_err().0;
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn a_chosen_kernel_is_checked_and_named_by_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("vmlinux");
        std::fs::write(&image, "\x7fELF").unwrap();
        let k = chosen(&image, None).unwrap();
        assert!(k.version.starts_with("chosen-") && k.modules.is_none());
        assert_eq!(
            uncompressed(dir.path(), &k),
            Some(image.clone()),
            "an ELF boots as is"
        );
        // Rebuilt in place: another identity, so another initramfs.
        std::fs::write(&image, "\x7fELF, rebuilt").unwrap();
        assert_ne!(chosen(&image, None).unwrap().version, k.version);
        let missing = chosen(&dir.path().join("nope"), None).unwrap_err().0;
        assert!(
            missing.contains("qemu.kernel") && !missing.contains('\n'),
            "{missing}"
        );
        let no_index = chosen(&image, Some(dir.path())).unwrap_err().0;
        assert!(no_index.contains("modules.dep"), "{no_index}");
    }
}
