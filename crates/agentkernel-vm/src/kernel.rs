//! The guest kernel: the newest `/boot/vmlinuz-*` whose modules are
//! installed (Debian's `linux-image-amd64` provides both).

use std::path::{Path, PathBuf};

use crate::{fail, Result};

#[derive(Debug, Clone)]
pub struct Kernel {
    pub image: PathBuf,
    pub version: String,
    pub modules: PathBuf,
}

pub fn find() -> Result<Kernel> {
    find_in(Path::new("/boot"), Path::new("/lib/modules"))
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
        modules: modules.join(&version),
        version,
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
pub fn uncompressed(cache_dir: &Path, kernel: &Kernel) -> Option<PathBuf> {
    let path = cache_dir.join(format!("vmlinux-{}", kernel.version));
    if path.is_file() {
        return Some(path);
    }
    let config = kernel
        .image
        .with_file_name(format!("config-{}", kernel.version));
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
}
