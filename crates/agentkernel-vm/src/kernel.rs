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
