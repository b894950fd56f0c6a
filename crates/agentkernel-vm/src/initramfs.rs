//! The guest's initramfs: the agent as `/init` (with the shared libraries
//! it links, if it is not static), the kernel modules it loads and their
//! load order. Built once per (agent binary, kernel) and cached; an
//! uncompressed newc cpio, which the kernel unpacks fastest.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use agentkernel_core::state::modified_ago;
use sha2::{Digest, Sha256};

use crate::kernel::Kernel;
use crate::{fail, Result};

/// What the agent needs from the kernel, by module name: the virtio
/// transports (PCI on a PC, MMIO on a microvm), the image disk, the host's
/// port, the image's filesystem (EROFS, see `crate::disk`, and the crc32c
/// its superblock checksum asks for by name), the overlays, the workspace
/// share, the NIC. Each transport only on its machine, the last two only
/// when the VM has such a device ([`only_with_device`]).
pub const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "crc32c_generic",
    "erofs",
    "overlay",
    "9pnet_virtio",
    "9p",
    "virtio_net",
];

/// The device without which the agent skips a [`MODULES`] entry and the
/// dependencies only it needs: a virtio device by its id as
/// `/sys/bus/virtio/devices/*/device` shows it (a VM with `--no-network`
/// has no NIC, one without a workspace or volume no 9p share), or the bus a
/// transport serves (`pci`: a PCI device exists; `mmio`: a virtio-mmio
/// device, `LNRO0005` in ACPI's tables). Under TCG loading a module is
/// milliseconds to tens of milliseconds of every cold boot.
fn only_with_device(module: &str) -> Option<&'static str> {
    match module {
        "virtio_pci" => Some("pci"),
        "virtio_mmio" => Some("mmio"),
        "virtio_net" => Some(VIRTIO_NET),
        "9pnet_virtio" | "9p" => Some(VIRTIO_9P),
        _ => None,
    }
}

/// Modules a kernel may lack: the machine that needs it then cannot be
/// booted with that kernel (no devices: the agent never says hello), the
/// other machine can.
fn optional(module: &str) -> bool {
    module == "virtio_mmio"
}

const VIRTIO_NET: &str = "0x0001";
const VIRTIO_9P: &str = "0x0009";

/// The cached initramfs for this agent and kernel, built if missing. The
/// agent is known by its file's identity (device, inode, size, mtime), not
/// its content: hashing megabytes on every run cost more than the rest of
/// a warm VM run, and any new build of the agent changes its identity.
pub fn ensure(cache_dir: &Path, agent: &Path, kernel: &Kernel) -> Result<PathBuf> {
    let cannot_read = |e: std::io::Error| {
        crate::Error(format!(
            "cannot read the guest agent {}: {e}; build it (`cargo build -p agentkernel`) next to agentkernel",
            agent.display()
        ))
    };
    let identity = std::fs::metadata(agent).map_err(cannot_read)?;
    let mut hash = Sha256::new();
    crate::hash_identity(&mut hash, &identity);
    hash.update(kernel.version.as_bytes());
    hash.update(MODULES.join(",").as_bytes());
    // What the builder does to them: a new way changes every cached archive.
    hash.update(b"modules: unsigned; load-order lines name the devices or buses they need");
    let key = crate::short_key(hash, 12);
    let path = cache_dir.join(format!("initramfs-{key}.cpio"));
    if let Some(cached) = std::fs::metadata(&path).ok().filter(|m| m.is_file()) {
        mark_used(&path, &cached);
        return Ok(path);
    }
    let binary = std::fs::read(agent).map_err(cannot_read)?;
    std::fs::create_dir_all(cache_dir)
        .or_else(|e| fail(format!("cannot create {}: {e}", cache_dir.display())))?;
    let mut archive = Cpio::default();
    for dir in ["dev", "proc", "sys", "lib", "lib/modules"] {
        archive.dir(dir);
    }
    // The kernel opens /dev/console for init's stdio before anything is mounted.
    archive.node("dev/console", libc::S_IFCHR | 0o600, (5, 1));
    archive.file("init", 0o755, &binary);
    for lib in shared_libraries(agent)? {
        let data =
            std::fs::read(&lib).or_else(|e| fail(format!("cannot read {}: {e}", lib.display())))?;
        let relative = lib.strip_prefix("/").unwrap_or(&lib);
        let mut parent = PathBuf::new();
        for part in relative.parent().into_iter().flat_map(|p| p.components()) {
            parent.push(part);
            archive.dir(&parent.to_string_lossy());
        }
        archive.file(&relative.to_string_lossy(), 0o755, &data);
    }
    // One module a line, dependencies first; after its name, the devices
    // any of which it is loaded for (none: always).
    let mut order = String::new();
    for (module, devices) in load_order(kernel)? {
        let name = module_name(&module) + ".ko";
        archive.file(
            &format!("lib/modules/{name}"),
            0o644,
            &read_module(&module)?,
        );
        order.push_str(&name);
        for device in devices {
            order.push(' ');
            order.push_str(device);
        }
        order.push('\n');
    }
    archive.file("lib/modules/load-order", 0o644, order.as_bytes());
    let tmp = cache_dir.join(format!(".initramfs-{key}.{}", std::process::id()));
    std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&archive.finish()))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map(|()| remove_unused_others(cache_dir, &path))
        .or_else(|e| {
            let _ = std::fs::remove_file(&tmp);
            fail(format!("cannot write {}: {e}", path.display()))
        })?;
    Ok(path)
}

/// How long an archive nobody boots from stays in the cache. Another
/// kernel's archive may be in use right now — a project's `[qemu] kernel`,
/// a concurrent run of another agentkernel build — and a VM about to start
/// opens its archive by name, so only archives unused this long are
/// removed; an upgraded agentkernel's old archive goes a day later.
const KEPT_UNUSED: Duration = Duration::from_secs(24 * 3600);

/// Archives record their last use in their mtime, refreshed at most hourly
/// so a warm run pays a write only once an hour.
const USE_RECORDED_EVERY: Duration = Duration::from_secs(3600);

fn mark_used(path: &Path, cached: &std::fs::Metadata) {
    let stale = modified_ago(cached).is_none_or(|age| age > USE_RECORDED_EVERY);
    if stale {
        // Best effort: a store this user cannot write only loses its
        // clean-up, not its runs.
        let _ = std::fs::File::open(path).and_then(|f| f.set_modified(SystemTime::now()));
    }
}

/// Removes the archives of other agents or kernels nobody has booted from
/// for `KEPT_UNUSED` (a VM already running has loaded its archive).
fn remove_unused_others(cache_dir: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(cache_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("initramfs-") && name.ends_with(".cpio")) || entry.path() == keep {
            continue;
        }
        let unused = entry
            .metadata()
            .ok()
            .and_then(|m| modified_ago(&m))
            .is_some_and(|age| age > KEPT_UNUSED);
        if unused {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The libraries (and loader) a dynamic binary needs, at their real paths.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let Ok(output) = Command::new("ldd").arg(binary).output() else {
        return Ok(Vec::new()); // no ldd: only a static agent can work, and then it does
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let mut libs = BTreeSet::new();
    for word in text.split_whitespace().filter(|w| w.starts_with('/')) {
        let path = Path::new(word);
        libs.insert(path.to_path_buf());
    }
    Ok(libs.into_iter().collect())
}

/// [`MODULES`] and their dependencies from modules.dep, dependencies first,
/// each with the devices any of which it is needed for (empty: always —
/// it is needed by a module loaded whatever the devices); modules built
/// into the kernel are skipped, and a kernel without a modules directory
/// has them all built in (the agent then loads none).
fn load_order(kernel: &Kernel) -> Result<Vec<(PathBuf, Vec<&'static str>)>> {
    let Some(dir) = &kernel.modules else {
        return Ok(Vec::new());
    };
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let deps_text = read("modules.dep");
    let builtin: BTreeSet<String> = read("modules.builtin")
        .lines()
        .map(module_name_of)
        .collect();
    let mut deps = std::collections::BTreeMap::new();
    for line in deps_text.lines() {
        if let Some((module, rest)) = line.split_once(':') {
            let list: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
            deps.insert(module_name_of(module), (module.to_string(), list));
        }
    }
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    // Per module, what each root it serves needs: None (always) or a device.
    let mut needed_for: std::collections::BTreeMap<String, BTreeSet<Option<&'static str>>> =
        Default::default();
    fn visit(
        name: &str,
        deps: &std::collections::BTreeMap<String, (String, Vec<String>)>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> bool {
        if !seen.insert(name.to_string()) {
            return true;
        }
        let Some((path, needs)) = deps.get(name) else {
            return false;
        };
        for dep in needs {
            visit(&module_name_of(dep), deps, seen, order);
        }
        order.push(path.clone());
        true
    }
    for name in MODULES {
        if builtin.contains(*name) {
            continue;
        }
        if !deps.contains_key(*name) && optional(name) {
            continue;
        }
        if !visit(name, &deps, &mut seen, &mut order) {
            return fail(format!(
                "the guest kernel {} has no {name} module (not in {}/modules.dep)",
                kernel.version,
                dir.display()
            ));
        }
        // This root's own closure (whatever earlier roots already pulled in).
        let mut closure = Vec::new();
        visit(name, &deps, &mut BTreeSet::new(), &mut closure);
        for path in closure {
            needed_for
                .entry(module_name_of(&path))
                .or_default()
                .insert(only_with_device(name));
        }
    }
    Ok(order
        .into_iter()
        .map(|p| {
            let needs = needed_for.remove(&module_name_of(&p)).unwrap_or_default();
            let devices = if needs.contains(&None) {
                Vec::new()
            } else {
                needs.into_iter().flatten().collect()
            };
            (dir.join(p), devices)
        })
        .collect())
}

/// `kernel/fs/9p/9p.ko.xz` → `9p` (dashes as underscores, as the kernel does).
fn module_name_of(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.split(".ko").next().unwrap_or(base).replace('-', "_")
}

fn module_name(path: &Path) -> String {
    module_name_of(&path.to_string_lossy())
}

/// A module as plain, unsigned ELF: the agent's finit_module takes no
/// compression flags, and the guest kernel need not check a signature.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    read_compressed_module(path).map(without_signature)
}

/// The module signature's trailer: `struct module_signature` (12 bytes,
/// the signature's length last, big-endian), then this magic.
const SIGNATURE_MAGIC: &[u8] = b"~Module signature appended~\n";

/// `module` without the signature a distribution appends (Debian signs
/// every module). The guest kernel hashes a signed module whole before it
/// loads it, with generic SHA-256 under TCG: ~0.4 s of a cold boot for the
/// ~4 MB of modules the agent loads (ext4 alone ~150 ms). The signature
/// protects nothing here: agentkernel reads the modules from the host's own
/// `/lib/modules` into the initramfs it builds, and the guest is the
/// sandbox. Without `module.sig_enforce` (or lockdown, which needs Secure
/// Boot the guest does not have) the kernel loads an unsigned module and
/// only marks itself tainted. A module that is not signed, or whose
/// trailer does not add up, is returned as it is.
fn without_signature(mut module: Vec<u8>) -> Vec<u8> {
    let Some(body) = module.len().checked_sub(SIGNATURE_MAGIC.len() + 12) else {
        return module;
    };
    if !module.ends_with(SIGNATURE_MAGIC) {
        return module;
    }
    let length = &module[body + 8..body + 12];
    let signature = u32::from_be_bytes([length[0], length[1], length[2], length[3]]) as usize;
    if let Some(end) = body.checked_sub(signature) {
        module.truncate(end);
    }
    module
}

fn read_compressed_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        Some("xz")
    } else if name.ends_with(".ko.zst") {
        Some("zstd")
    } else if name.ends_with(".ko.gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => std::fs::read(path).or_else(|e| fail(format!("cannot read {name}: {e}"))),
        Some(tool) => match Command::new(tool).arg("-dc").arg(path).output() {
            Ok(out) if out.status.success() => Ok(out.stdout),
            _ => fail(format!("cannot decompress {name}: install {tool}")),
        },
    }
}

/// A newc ("070701") cpio archive in memory.
#[derive(Default)]
struct Cpio {
    data: Vec<u8>,
    inode: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn dir(&mut self, path: &str) {
        if self.dirs.insert(path.to_string()) {
            self.entry(path, libc::S_IFDIR | 0o755, (0, 0), &[]);
        }
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.entry(path, libc::S_IFREG | mode, (0, 0), data);
    }

    fn node(&mut self, path: &str, mode: u32, rdev: (u32, u32)) {
        self.entry(path, mode, rdev, &[]);
    }

    fn entry(&mut self, path: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.inode += 1;
        let nlink = if mode & libc::S_IFMT == libc::S_IFDIR {
            2
        } else {
            1
        };
        let fields = [
            self.inode,
            mode,
            0,
            0,
            nlink,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            path.len() as u32 + 1,
            0,
        ];
        self.data.extend_from_slice(b"070701");
        for field in fields {
            self.data
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.data.extend_from_slice(path.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_modules_appended_signature_is_cut_off() {
        let mut signed = b"ELF-body".to_vec();
        signed.extend_from_slice(b"SIGNATURE");
        signed.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 9]);
        signed.extend_from_slice(SIGNATURE_MAGIC);
        assert_eq!(without_signature(signed), b"ELF-body");
        assert_eq!(without_signature(b"ELF-body".to_vec()), b"ELF-body");
        // A trailer claiming more than the file holds: left alone.
        let mut bogus = b"x".to_vec();
        bogus.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        bogus.extend_from_slice(SIGNATURE_MAGIC);
        assert_eq!(without_signature(bogus.clone()), bogus);
    }

    #[test]
    fn module_names_are_normalised() {
        assert_eq!(module_name_of("kernel/fs/9p/9p.ko.xz"), "9p");
        assert_eq!(
            module_name_of("kernel/net/9p/9pnet_virtio.ko"),
            "9pnet_virtio"
        );
        assert_eq!(
            module_name_of("kernel/x/crc32c-generic.ko"),
            "crc32c_generic"
        );
    }

    #[test]
    fn another_kernels_archive_stays_until_unused_for_a_day() {
        let dir = tempfile::tempdir().unwrap();
        let archive = |name: &str, age: Duration| {
            let path = dir.path().join(name);
            std::fs::write(&path, b"cpio").unwrap();
            let f = std::fs::File::open(&path).unwrap();
            f.set_modified(SystemTime::now() - age).unwrap();
            path
        };
        let current = archive("initramfs-current.cpio", Duration::ZERO);
        let in_use = archive("initramfs-other-kernel.cpio", Duration::from_secs(3600));
        let abandoned = archive("initramfs-old-agent.cpio", KEPT_UNUSED * 2);
        let unrelated = archive("vmlinux-6.1", KEPT_UNUSED * 2);
        remove_unused_others(dir.path(), &current);
        assert!(current.is_file() && in_use.is_file() && unrelated.is_file());
        assert!(!abandoned.exists());
    }

    #[test]
    fn a_cache_hit_records_its_use_at_most_hourly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("initramfs-x.cpio");
        std::fs::write(&path, b"cpio").unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let two_days_ago = SystemTime::now() - KEPT_UNUSED * 2;
        f.set_modified(two_days_ago).unwrap();
        mark_used(&path, &std::fs::metadata(&path).unwrap());
        let refreshed = std::fs::metadata(&path).unwrap().modified().unwrap();
        assert!(refreshed.elapsed().unwrap() < USE_RECORDED_EVERY);
        let recent = SystemTime::now() - Duration::from_secs(60);
        f.set_modified(recent).unwrap();
        mark_used(&path, &std::fs::metadata(&path).unwrap());
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            recent
        );
    }

    fn kernel(modules: Option<PathBuf>) -> Kernel {
        Kernel {
            image: PathBuf::from("/k"),
            version: "test".into(),
            modules,
            origin: crate::kernel::Origin::Chosen,
        }
    }

    #[test]
    fn built_in_drivers_are_not_loaded() {
        let dir = tempfile::tempdir().unwrap();
        // Everything built in: modules.builtin lists them, modules.dep is empty.
        let builtin: String = MODULES
            .iter()
            .map(|m| format!("kernel/x/{}.ko\n", m.replace('_', "-")))
            .collect();
        std::fs::write(dir.path().join("modules.builtin"), builtin).unwrap();
        std::fs::write(dir.path().join("modules.dep"), "").unwrap();
        let with_dir = kernel(Some(dir.path().to_path_buf()));
        assert!(load_order(&with_dir).unwrap().is_empty());
        // No modules directory at all: nothing to load either.
        assert!(load_order(&kernel(None)).unwrap().is_empty());
        // One module neither built in nor in modules.dep is an error naming it.
        std::fs::write(
            dir.path().join("modules.builtin"),
            "kernel/fs/ext4/ext4.ko\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("modules.dep"),
            "kernel/fs/overlayfs/overlay.ko:\n",
        )
        .unwrap();
        let err = load_order(&with_dir).unwrap_err().0;
        assert!(err.contains("no virtio_pci module"), "{err}");
    }

    /// A module is tagged with the devices of the roots that need it: none
    /// when a root loaded whatever the devices needs it too.
    #[test]
    fn each_virtio_transport_is_tagged_with_its_bus_and_mmio_may_be_missing() {
        let dir = tempfile::tempdir().unwrap();
        let builtin = |except: &[&str]| -> String {
            MODULES
                .iter()
                .filter(|m| !except.contains(m))
                .map(|m| format!("kernel/x/{m}.ko\n"))
                .collect()
        };
        std::fs::write(
            dir.path().join("modules.builtin"),
            builtin(&["virtio_pci", "virtio_mmio"]),
        )
        .unwrap();
        let deps = "k/virtio.ko:\n\
                    k/virtio_ring.ko:\n\
                    k/virtio_pci_modern_dev.ko:\n\
                    k/virtio_pci.ko: k/virtio_pci_modern_dev.ko k/virtio_ring.ko k/virtio.ko\n";
        let mmio = "k/virtio_mmio.ko: k/virtio_ring.ko k/virtio.ko\n";
        std::fs::write(dir.path().join("modules.dep"), format!("{deps}{mmio}")).unwrap();
        let tagged = |dir: &Path| -> Vec<(String, Vec<&str>)> {
            load_order(&kernel(Some(dir.to_path_buf())))
                .unwrap()
                .into_iter()
                .map(|(p, devices)| (module_name(&p), devices))
                .collect()
        };
        assert_eq!(
            tagged(dir.path()),
            [
                ("virtio_pci_modern_dev".to_string(), vec!["pci"]),
                ("virtio_ring".into(), vec!["mmio", "pci"]),
                ("virtio".into(), vec!["mmio", "pci"]),
                ("virtio_pci".into(), vec!["pci"]),
                ("virtio_mmio".into(), vec!["mmio"]),
            ]
        );
        // A kernel without the MMIO transport still boots a PC.
        std::fs::write(dir.path().join("modules.dep"), deps).unwrap();
        assert_eq!(tagged(dir.path()).last().unwrap().0, "virtio_pci");
        // Without the PCI one it is an error: a PC is the default machine.
        std::fs::write(dir.path().join("modules.dep"), mmio).unwrap();
        assert!(load_order(&kernel(Some(dir.path().to_path_buf()))).is_err());
    }

    #[test]
    fn modules_only_a_device_needs_are_tagged_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let others: String = MODULES
            .iter()
            .filter(|m| !["overlay", "9p", "9pnet_virtio", "virtio_net"].contains(m))
            .map(|m| format!("kernel/x/{m}.ko\n"))
            .collect();
        std::fs::write(dir.path().join("modules.builtin"), others).unwrap();
        std::fs::write(
            dir.path().join("modules.dep"),
            "k/overlay.ko: k/common.ko\n\
             k/common.ko:\n\
             k/9pnet.ko:\n\
             k/netfs.ko:\n\
             k/9pnet_virtio.ko: k/9pnet.ko\n\
             k/9p.ko: k/9pnet.ko k/netfs.ko\n\
             k/failover.ko:\n\
             k/virtio_net.ko: k/failover.ko k/netfs.ko k/common.ko\n",
        )
        .unwrap();
        let tagged: Vec<(String, Vec<&str>)> = load_order(&kernel(Some(dir.path().to_path_buf())))
            .unwrap()
            .into_iter()
            .map(|(p, devices)| (module_name(&p), devices))
            .collect();
        let share = vec![VIRTIO_9P];
        assert_eq!(
            tagged,
            [
                ("common".to_string(), vec![]),
                ("overlay".into(), vec![]),
                ("9pnet".into(), share.clone()),
                ("9pnet_virtio".into(), share.clone()),
                ("netfs".into(), vec![VIRTIO_NET, VIRTIO_9P]),
                ("9p".into(), share),
                ("failover".into(), vec![VIRTIO_NET]),
                ("virtio_net".into(), vec![VIRTIO_NET]),
            ]
        );
    }

    #[test]
    fn dependencies_load_first_and_built_ins_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let others: String = MODULES
            .iter()
            .filter(|m| !["9p", "9pnet_virtio"].contains(m))
            .map(|m| format!("kernel/x/{m}.ko\n"))
            .collect();
        std::fs::write(dir.path().join("modules.builtin"), others).unwrap();
        std::fs::write(
            dir.path().join("modules.dep"),
            "kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz\nkernel/net/9p/9pnet.ko.xz:\nkernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz\n",
        )
        .unwrap();
        let order: Vec<String> = load_order(&kernel(Some(dir.path().to_path_buf())))
            .unwrap()
            .iter()
            .map(|(p, _)| module_name(p))
            .collect();
        assert_eq!(order, ["9pnet", "9pnet_virtio", "9p"]);
    }

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut c = Cpio::default();
        c.dir("dev");
        c.file("init", 0o755, b"abc");
        let data = c.finish();
        assert_eq!(data.len() % 4, 0);
        assert!(data.starts_with(b"070701"));
        assert!(data.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
