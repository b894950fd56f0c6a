//! The sandbox's filesystem, built inside its private mount namespace by
//! the sandbox's init process: an overlay root, fresh `/proc`, a minimal
//! `/dev`, read-only `/sys`, the OCI default masked and read-only paths, the
//! workspace and volumes, then `pivot_root`.
//!
//! Every mount lives in the sandbox's own mount namespace, so the host never
//! sees one and the kernel drops them all when the sandbox's last process
//! exits — nothing to unmount after a crash. Paths inside the image are
//! opened component by component without following symlinks (`sys::open_beneath`)
//! before anything is mounted on them.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use agentkernel_core::secrets::{SecretFile, SECRETS_DIR};

use crate::plan::{MountKind, Plan, RootSource};
use crate::sys::{self, context, cstr, fd_path, mount, open_beneath, Host, Leaf, Syscall};
use agentkernel_sys::syscall::Kind;

/// The symlinks every sandbox's `/dev` has (as Docker's): the pty
/// multiplexer and the standard streams. The VM guest's `/dev` uses them too.
pub const DEV_SYMLINKS: [(&str, &str); 5] = [
    ("ptmx", "pts/ptmx"),
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
];

/// Paths the OCI runtime spec masks by default: kernel memory, keys, timers,
/// firmware — information or controls a sandbox has no business with.
const MASKED_PATHS: [&str; 11] = [
    "proc/acpi",
    "proc/asound",
    "proc/interrupts",
    "proc/kcore",
    "proc/keys",
    "proc/latency_stats",
    "proc/timer_list",
    "proc/sched_debug",
    "proc/scsi",
    "sys/firmware",
    "sys/devices/virtual/powercap",
];
const READ_ONLY_PATHS: [&str; 5] = [
    "proc/bus",
    "proc/fs",
    "proc/irq",
    "proc/sys",
    "proc/sysrq-trigger",
];

/// `/dev` nodes: name, major, minor.
const DEVICES: [(&str, u32, u32); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// Where the root is assembled (inside the sandbox's tmpfs layer).
pub fn scratch_root(scratch: &Path) -> PathBuf {
    scratch.join("layer/root")
}

/// Builds the root's own parts: the image's overlay, /proc, /dev, /sys, the
/// masks, the files we write into it. Runs as root in fresh mount, pid, net,
/// uts and ipc namespaces, before the command's process exists. Then come
/// [`mount_cgroup_view`], [`mount_workspace_and_volumes`] and [`enter`]:
/// the workspace's disk, mounted meanwhile by another thread, is waited for
/// only after everything that does not need it. Returns the root, opened.
pub fn build(plan: &Plan) -> io::Result<OwnedFd> {
    mount("", "/", "", libc::MS_REC | libc::MS_PRIVATE, None)?;
    let root_path = scratch_root(&plan.scratch);
    let root_str = root_path.to_string_lossy().into_owned();
    mount_overlay_root(plan, &root_str)?;
    let root = sys::open_dir(&root_path)?;

    let proc_dir = open_beneath(&root, "proc", Leaf::Dir)?;
    mount(
        "proc",
        &fd_path(&proc_dir),
        "proc",
        NOSUID_NODEV_NOEXEC,
        None,
    )?;
    build_dev(&root, plan.rootless.is_some())?;
    let sys_dir = open_beneath(&root, "sys", Leaf::Dir)?;
    mount(
        "sysfs",
        &fd_path(&sys_dir),
        "sysfs",
        NOSUID_NODEV_NOEXEC | libc::MS_RDONLY,
        None,
    )?;
    mask_kernel_paths(&Host, &root_str)?;
    for path in &plan.hidden {
        let dir = open_beneath(&root, path, Leaf::Dir)?;
        mount(
            "tmpfs",
            &fd_path(&dir),
            "tmpfs",
            libc::MS_RDONLY,
            Some("size=0"),
        )?;
    }

    // Before any user mount, so that all of this lands in the root's own
    // layer: written after them, a volume at /etc would have the files
    // written into the host's directory, and a volume under /tmp would be
    // hidden by the tmpfs. A volume over one of these paths shadows ours,
    // as the user asked. (And the workspace's disk, mounted meanwhile by
    // another thread, is not waited for before it is needed.)
    if let Some(egress) = &plan.egress {
        crate::egress::install_ca(&root, &egress.ca_pem)
            .map_err(context("install the egress proxy's CA"))?;
    }
    sys::write_beneath(&root, "etc/hostname", &format!("{}\n", plan.hostname))?;
    sys::write_beneath(
        &root,
        "etc/hosts",
        &format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{}\n",
            plan.hostname
        ),
    )?;
    if let Some(resolv) = &plan.resolv_conf {
        sys::write_beneath(&root, "etc/resolv.conf", resolv)?;
    }
    if plan.read_only_root {
        let tmp = open_beneath(&root, "tmp", Leaf::Dir)?;
        mount(
            "tmpfs",
            &fd_path(&tmp),
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some(&format!("mode=1777,size={}", plan.tmp_size_bytes)),
        )?;
    }
    Ok(root)
}

/// The workspace and the user's volumes, over the root [`build`] made
/// (`root`). `workspace_disk` yields the workspace's disk, mounted by the supervisor
/// (see `disk::mount_detached`), or None for init to mount it itself.
pub fn mount_workspace_and_volumes(
    plan: &Plan,
    root: &OwnedFd,
    workspace_disk: &mut dyn FnMut() -> Option<std::os::fd::OwnedFd>,
) -> io::Result<()> {
    if let Some(image) = &plan.workspace_disk {
        let target = plan.scratch.join(crate::disk::MOUNT_NAME);
        match workspace_disk() {
            Some(mount) => crate::disk::attach_detached(&mount, &target)?,
            None => crate::disk::mount_workspace_image(image, &target)?,
        }
        crate::trace::phase("init: workspace disk mounted");
    }
    for (i, m) in plan.mounts.iter().enumerate() {
        mount_user_path(plan, root, i, m)?;
    }
    open_beneath(root, &plan.workdir, Leaf::Dir)
        .map_err(context(format_args!("working directory {}", plan.workdir)))?;
    Ok(())
}

/// The root's `/sys/fs/cgroup`, once the sandbox is in its cgroup
/// namespace (the mount shows the mounter's cgroup namespace). Before the
/// volumes, so that a volume there shadows it, as the user asked.
pub fn mount_cgroup_view(plan: &Plan) -> io::Result<()> {
    // A rootless sandbox has no cgroup of its own to show (and may not mount
    // v1 hierarchies): its /sys/fs/cgroup stays sysfs's empty directory.
    if plan.rootless.is_none() {
        let root_str = scratch_root(&plan.scratch).to_string_lossy().into_owned();
        let v1 = crate::cgroup::host_is_v1().then(crate::cgroup::v1_hierarchies);
        mount_cgroups(&Host, &root_str, v1.as_deref())?;
    }
    Ok(())
}

/// The last steps: `pivot_root`, the files put into the root, and the
/// read-only remount.
pub fn enter(plan: &Plan) -> io::Result<()> {
    let root_str = scratch_root(&plan.scratch).to_string_lossy().into_owned();
    pivot_into(&root_str)?;
    if !plan.secret_files.is_empty() {
        write_secret_files(&plan.secret_files, plan.user.as_deref())
            .map_err(context("--secret-file"))?;
    }
    if !plan.files.is_empty() {
        // After pivot_root: "/" is the sandbox's root, and every path is
        // resolved inside it.
        crate::copy::inject(&crate::copy::SandboxRoot::current()?, &plan.files)?;
    }
    if plan.read_only_root {
        mount(
            "",
            "/",
            "",
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            None,
        )?;
    }
    Ok(())
}

/// `--secret-file`: a tmpfs at [`SECRETS_DIR`] (in the sandbox's mount
/// namespace only: nothing reaches the host's disk), owned by the command's
/// `user`, mode 0500, each file 0400. Runs after `pivot_root` (in a VM:
/// after the agent's switch into the root), before a read-only root is made
/// read-only, so the image's own `/etc/passwd` names the user and no path
/// can lead out of the root.
pub fn write_secret_files(files: &[SecretFile], user: Option<&str>) -> io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let identity = crate::user::resolve(user)?;
    std::fs::create_dir_all(SECRETS_DIR)?;
    let bytes: usize = files.iter().map(|f| f.content.len()).sum();
    // Room for the files and their inodes; charged to the sandbox's memory.
    let size = (bytes + 4096 * files.len()).max(64 * 1024);
    mount(
        "tmpfs",
        SECRETS_DIR,
        "tmpfs",
        NOSUID_NODEV_NOEXEC,
        Some(&format!("mode=0700,size={size}")),
    )?;
    for file in files {
        let path = format!("{SECRETS_DIR}/{}", file.name);
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&path)?;
        std::io::Write::write_all(&mut out, file.content.as_bytes())?;
        std::os::unix::fs::fchown(&out, Some(identity.uid), Some(identity.gid))?;
    }
    std::os::unix::fs::chown(SECRETS_DIR, Some(identity.uid), Some(identity.gid))?;
    std::fs::set_permissions(SECRETS_DIR, std::fs::Permissions::from_mode(0o500))
}

/// The root's writable layer is a tmpfs private to the sandbox's mount
/// namespace: nothing to delete afterwards (the kernel frees it with the
/// namespace, even after a `kill -9`), and what the command writes there is
/// charged to its memory cgroup. (The workspace's copy-on-write layer stays
/// on disk: builds write a lot there.) It also lets the host's own `/` be a
/// lower layer: an upper directory beneath it would overlap it.
fn mount_overlay_root(plan: &Plan, root: &str) -> io::Result<()> {
    let layer = plan.scratch.join("layer");
    // Without a cap tmpfs takes at most half the RAM; the memory cgroup
    // bounds it further either way.
    let options = match plan.root_layer_bytes {
        Some(bytes) => format!("mode=755,size={bytes}"),
        None => "mode=755".to_string(),
    };
    mount(
        "tmpfs",
        &layer.to_string_lossy(),
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&options),
    )?;
    let upper = layer.join("upper");
    let work = layer.join("work");
    for d in [&upper, &work, &layer.join("root")] {
        std::fs::create_dir(d).map_err(context(format_args!("create {}", d.display())))?;
    }
    if plan.rootless.is_some() && matches!(plan.root, RootSource::Host) {
        return rootless_host_root(plan, &layer, root);
    }
    let lower = match &plan.root {
        RootSource::Layers(layers) => {
            // overlayfs takes lower layers top first. Relative names keep the
            // option string short (a page at most) for images with many layers.
            let common = layers.first().and_then(|l| l.parent());
            let relative = common.filter(|c| layers.iter().all(|l| l.parent() == Some(*c)));
            let names: Vec<String> = layers
                .iter()
                .rev()
                .map(|l| match relative {
                    Some(_) => l
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned(),
                    None => l.to_string_lossy().into_owned(),
                })
                .collect();
            if let Some(dir) = relative {
                std::env::set_current_dir(dir)
                    .map_err(context(format_args!("layers {}", dir.display())))?;
            }
            names.join(":")
        }
        RootSource::Host => "/".to_string(),
    };
    let options = format!(
        "lowerdir={lower},upperdir={},workdir={}{}",
        upper.display(),
        work.display(),
        overlay_xattrs(plan)
    );
    let result = mount_overlay(root, &options);
    let _ = std::env::set_current_dir("/");
    result
}

fn build_dev(root: &OwnedFd, rootless: bool) -> io::Result<()> {
    let dev = open_beneath(root, "dev", Leaf::Dir)?;
    mount(
        "tmpfs",
        &fd_path(&dev),
        "tmpfs",
        libc::MS_NOSUID | libc::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )?;
    // Reopen: the fd taken before the mount still points beneath it.
    let dev = open_beneath(root, "dev", Leaf::Dir)?;
    for (name, major, minor) in DEVICES {
        let c = cstr(name)?;
        // SAFETY: valid dir fd and C string.
        let rc = unsafe {
            libc::mknodat(
                dev.as_raw_fd(),
                c.as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(major, minor),
            )
        };
        if rc != 0 {
            // Without CAP_MKNOD (rootless), bind the host's node instead.
            let node = open_beneath(&dev, name, Leaf::File)?;
            mount(
                &format!("/dev/{name}"),
                &fd_path(&node),
                "",
                libc::MS_BIND,
                None,
            )?;
        }
    }
    for dir in ["pts", "shm", "mqueue"] {
        open_beneath(&dev, dir, Leaf::Dir)?;
    }
    let pts = open_beneath(&dev, "pts", Leaf::Dir)?;
    mount(
        "devpts",
        &fd_path(&pts),
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        // Group `tty` (5) does not exist in a rootless sandbox's user namespace.
        Some(if rootless {
            "newinstance,ptmxmode=0666,mode=0620"
        } else {
            "newinstance,ptmxmode=0666,mode=0620,gid=5"
        }),
    )?;
    let shm = open_beneath(&dev, "shm", Leaf::Dir)?;
    mount(
        "shm",
        &fd_path(&shm),
        "tmpfs",
        NOSUID_NODEV_NOEXEC,
        Some("mode=1777,size=65536k"),
    )?;
    let mqueue = open_beneath(&dev, "mqueue", Leaf::Dir)?;
    mount(
        "mqueue",
        &fd_path(&mqueue),
        "mqueue",
        NOSUID_NODEV_NOEXEC,
        None,
    )?;
    for (link, target) in DEV_SYMLINKS {
        let (l, t) = (cstr(link)?, cstr(target)?);
        // SAFETY: valid C strings and dir fd.
        if unsafe { libc::symlinkat(t.as_ptr(), dev.as_raw_fd(), l.as_ptr()) } != 0 {
            return Err(context(format_args!("symlink /dev/{link}"))(
                io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// The sandbox's own cgroup, read-only at `/sys/fs/cgroup` as Docker shows
/// it: the cgroup namespace makes the sandbox's group the root of the view,
/// so a program can read its limits and nothing above them.
/// `v1`: the host's v1 hierarchies as (directory, mount options), or
/// None on cgroup v2.
fn mount_cgroups(sys: &dyn Syscall, root: &str, v1: Option<&[(String, String)]>) -> io::Result<()> {
    let base = format!("{root}/sys/fs/cgroup");
    let ro = NOSUID_NODEV_NOEXEC | libc::MS_RDONLY;
    let Some(hierarchies) = v1 else {
        return sys.mount("cgroup2", &base, "cgroup2", ro, None);
    };
    sys.mount(
        "tmpfs",
        &base,
        "tmpfs",
        NOSUID_NODEV_NOEXEC,
        Some("mode=755"),
    )?;
    for (dir, options) in hierarchies {
        let path = format!("{base}/{dir}");
        sys.create_dir(&path)?;
        sys.mount("cgroup", &path, "cgroup", ro, Some(options))?;
    }
    sys.mount("", &base, "", libc::MS_BIND | libc::MS_REMOUNT | ro, None)
}

/// The new `/proc` and `/sys` are kernel filesystems we just mounted, so
/// plain paths beneath the root are safe here.
fn mask_kernel_paths(sys: &dyn Syscall, root: &str) -> io::Result<()> {
    for rel in MASKED_PATHS {
        let path = format!("{root}/{rel}");
        match sys.kind(&path) {
            None => continue,
            Some(Kind::Dir) => {
                sys.mount("tmpfs", &path, "tmpfs", libc::MS_RDONLY, Some("size=0"))?
            }
            Some(Kind::Other) => sys.mount("/dev/null", &path, "", libc::MS_BIND, None)?,
        }
    }
    for rel in READ_ONLY_PATHS {
        let path = format!("{root}/{rel}");
        if sys.kind(&path).is_none() {
            continue;
        }
        sys.mount(&path, &path, "", libc::MS_BIND | libc::MS_REC, None)?;
        sys.mount(
            "",
            &path,
            "",
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | NOSUID_NODEV_NOEXEC,
            None,
        )?;
    }
    Ok(())
}

fn mount_user_path(
    plan: &Plan,
    root: &OwnedFd,
    index: usize,
    m: &crate::plan::Mount,
) -> io::Result<()> {
    let meta = std::fs::metadata(&m.host).map_err(context(format_args!("{}", m.host.display())))?;
    let leaf = if meta.is_dir() { Leaf::Dir } else { Leaf::File };
    let target = open_beneath(root, &m.target, leaf)?;
    let host = m.host.to_string_lossy();
    match &m.kind {
        MountKind::Bind { read_only } => {
            mount(&host, &fd_path(&target), "", libc::MS_BIND, None)?;
            if *read_only {
                // Reopen to reach the bind mount itself, then make it read-only.
                let mounted = open_beneath(root, &m.target, leaf)?;
                mount(
                    "",
                    &fd_path(&mounted),
                    "",
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | locked_flags(&mounted),
                    None,
                )?;
            }
        }
        MountKind::CopyOnWrite => {
            // Flat in the scratch dir: each directory costs a create and a
            // delete on the host's disk per run. With a disk cap, in the
            // capped filesystem mounted there (see disk.rs).
            let layers = match plan.workspace_disk {
                Some(_) => plan.scratch.join(crate::disk::MOUNT_NAME),
                None => plan.scratch.clone(),
            };
            let [upper, work] = copy_on_write_dirs(index).map(|d| layers.join(d));
            for dir in [&upper, &work] {
                match std::fs::create_dir(dir) {
                    // Made empty in the disk's template (see disk::format),
                    // which nothing but this run has mounted.
                    Err(e)
                        if e.kind() == io::ErrorKind::AlreadyExists
                            && plan.workspace_disk.is_some() => {}
                    other => other.map_err(context(format_args!("create {}", dir.display())))?,
                }
            }
            let options = format!(
                "lowerdir={host},upperdir={},workdir={}{}",
                upper.display(),
                work.display(),
                overlay_xattrs(plan)
            );
            mount_overlay(&fd_path(&target), &options)?;
        }
    }
    Ok(())
}

/// The overlay's upper and work directories of the `index`th mount when it
/// is copy-on-write, in the scratch dir or on the workspace's disk.
pub(crate) fn copy_on_write_dirs(index: usize) -> [String; 2] {
    [format!("cow{index}-upper"), format!("cow{index}-work")]
}

/// Rootless `--image host`. overlayfs refuses a lower layer with mounts
/// beneath it that the user namespace has locked ("failed to clone
/// lowerpath"), and `/` always has some. So the root is assembled per
/// top-level entry, matching what the root path's single overlay shows:
/// a directory on the root filesystem becomes an overlay of its own (writes
/// land in the sandbox's tmpfs layer); one that is another filesystem's
/// mount point stays an empty directory, as it appears under the root
/// filesystem; one with mounts somewhere below it is bound read-only with
/// them; symlinks are copied. /proc, /sys and /dev are built afterwards.
fn rootless_host_root(plan: &Plan, layer: &Path, root: &str) -> io::Result<()> {
    let mount_points = host_mount_points();
    // pivot_root needs the new root to be a mount point.
    mount(root, root, "", libc::MS_BIND, None)?;
    let entries = std::fs::read_dir("/").map_err(context("list /"))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let host = format!("/{name}");
        let target = format!("{root}/{name}");
        let Ok(meta) = std::fs::symlink_metadata(&host) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            let to = std::fs::read_link(&host).map_err(context(format_args!("read {host}")))?;
            std::os::unix::fs::symlink(to, &target)
                .map_err(context(format_args!("link {target}")))?;
            continue;
        }
        if !meta.is_dir() {
            std::fs::write(&target, b"").map_err(context(format_args!("create {target}")))?;
            mount(&host, &target, "", libc::MS_BIND, None)?;
            mount(
                "",
                &target,
                "",
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                None,
            )?;
            continue;
        }
        std::fs::create_dir(&target).map_err(context(format_args!("create {target}")))?;
        let below = format!("{host}/");
        if ["proc", "sys", "dev"].contains(&name.as_str()) || mount_points.contains(&host) {
            continue;
        }
        if mount_points.iter().any(|m| m.starts_with(&below)) {
            mount(&host, &target, "", libc::MS_BIND | libc::MS_REC, None)?;
            let flags = locked_flags(&sys::open_dir(Path::new(&target))?);
            mount(
                "",
                &target,
                "",
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | flags,
                None,
            )?;
            continue;
        }
        let (upper, work) = (
            layer.join("upper").join(&name),
            layer.join("work").join(&name),
        );
        for d in [&upper, &work] {
            std::fs::create_dir(d).map_err(context(format_args!("create {}", d.display())))?;
        }
        let options = format!(
            "lowerdir={host},upperdir={},workdir={}{}",
            upper.display(),
            work.display(),
            overlay_xattrs(plan)
        );
        mount_overlay(&target, &options)?;
    }
    Ok(())
}

/// Every mount point in this mount namespace (`/proc/self/mountinfo`'s fifth
/// field, with its octal escapes undone).
fn host_mount_points() -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| {
            field
                .replace("\\040", " ")
                .replace("\\011", "\t")
                .replace("\\012", "\n")
                .replace("\\134", "\\")
        })
        .collect()
}

/// Rootless overlayfs keeps its metadata in `user.*` xattrs, where layers
/// unpacked without root also mark their opaque directories.
/// Mounts an overlay whose upper layer is the sandbox's own, thrown away
/// with it. `volatile` (Linux 5.10) skips every sync to the upper
/// filesystem: nothing written there has to survive a host crash, and
/// without it unmounting (when the sandbox ends) syncs the whole upper
/// filesystem — the host's disk for a workspace's copy-on-write layer —
/// about 1 ms here, far more on a host that is writing a lot. Older kernels
/// refuse the option and get a plain mount.
fn mount_overlay(target: &str, options: &str) -> io::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    static VOLATILE_REFUSED: AtomicBool = AtomicBool::new(false);
    if !VOLATILE_REFUSED.load(Ordering::Relaxed) {
        match mount(
            "overlay",
            target,
            "overlay",
            0,
            Some(&format!("{options},volatile")),
        ) {
            // EINVAL (the error names the mount, not the errno).
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                VOLATILE_REFUSED.store(true, Ordering::Relaxed);
            }
            result => return result,
        }
    }
    mount("overlay", target, "overlay", 0, Some(options))
}

fn overlay_xattrs(plan: &Plan) -> &'static str {
    if plan.rootless.is_some() {
        ",userxattr"
    } else {
        ""
    }
}

/// The flags a remount of a bind mount must repeat: in a user namespace the
/// kernel locks a host mount's nosuid, nodev, noexec and atime flags, and a
/// remount that would clear one fails.
fn locked_flags(mounted: &OwnedFd) -> libc::c_ulong {
    // SAFETY: fstatvfs writes into the zeroed struct we own.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and out-pointer.
    if unsafe { libc::fstatvfs(mounted.as_raw_fd(), &mut st) } != 0 {
        return 0;
    }
    [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ]
    .into_iter()
    .filter(|(st_flag, _)| st.f_flag & st_flag != 0)
    .fold(0, |flags, (_, ms_flag)| flags | ms_flag)
}

/// `pivot_root(".", ".")` stacks the old root under the new one; detaching
/// it leaves only the sandbox's tree (the runc idiom: no directory for the old root needed).
fn pivot_into(root: &str) -> io::Result<()> {
    std::env::set_current_dir(root).map_err(context("chdir to the new root"))?;
    let dot = c".";
    // SAFETY: valid C strings; pivot_root has no other preconditions we break.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
        return Err(context("pivot_root")(io::Error::last_os_error()));
    }
    // SAFETY: valid C string.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(context("detach the old root")(io::Error::last_os_error()));
    }
    std::env::set_current_dir("/").map_err(context("chdir /"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentkernel_sys::syscall::{Call, Recorder};

    fn mount(
        source: &str,
        target: &str,
        fstype: &str,
        flags: libc::c_ulong,
        data: Option<&str>,
    ) -> Call {
        Call::Mount {
            source: source.into(),
            target: target.into(),
            fstype: fstype.into(),
            flags,
            data: data.map(Into::into),
        }
    }

    /// Directories are hidden under an empty read-only tmpfs, files under
    /// /dev/null; read-only paths are bound and remounted read-only with
    /// nosuid, nodev, noexec; what the kernel does not have is skipped.
    #[test]
    fn kernel_paths_are_masked_and_made_read_only() {
        let sys = Recorder::with(&[
            ("/r/proc/kcore", Kind::Other),
            ("/r/sys/firmware", Kind::Dir),
            ("/r/proc/sys", Kind::Dir),
        ]);
        mask_kernel_paths(&sys, "/r").unwrap();
        let ro_remount = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | NOSUID_NODEV_NOEXEC;
        assert_eq!(
            sys.calls(),
            [
                mount("/dev/null", "/r/proc/kcore", "", libc::MS_BIND, None),
                mount(
                    "tmpfs",
                    "/r/sys/firmware",
                    "tmpfs",
                    libc::MS_RDONLY,
                    Some("size=0")
                ),
                mount(
                    "/r/proc/sys",
                    "/r/proc/sys",
                    "",
                    libc::MS_BIND | libc::MS_REC,
                    None
                ),
                mount("", "/r/proc/sys", "", ro_remount, None),
            ]
        );
    }

    /// v2: the one hierarchy, read-only. v1: a tmpfs with a directory and a
    /// read-only mount per hierarchy (options as the host mounted them),
    /// then the tmpfs itself remounted read-only.
    #[test]
    fn cgroups_are_mounted_read_only_on_v1_and_v2() {
        let ro = NOSUID_NODEV_NOEXEC | libc::MS_RDONLY;
        let v2 = Recorder::default();
        mount_cgroups(&v2, "/r", None).unwrap();
        assert_eq!(
            v2.calls(),
            [mount("cgroup2", "/r/sys/fs/cgroup", "cgroup2", ro, None)]
        );

        let v1 = Recorder::default();
        let hierarchies = [
            ("cpu,cpuacct".to_string(), "cpu,cpuacct".to_string()),
            ("memory".to_string(), "memory".to_string()),
        ];
        mount_cgroups(&v1, "/r", Some(&hierarchies)).unwrap();
        let base = "/r/sys/fs/cgroup";
        assert_eq!(
            v1.calls(),
            [
                mount(
                    "tmpfs",
                    base,
                    "tmpfs",
                    NOSUID_NODEV_NOEXEC,
                    Some("mode=755")
                ),
                Call::CreateDir(format!("{base}/cpu,cpuacct")),
                mount(
                    "cgroup",
                    &format!("{base}/cpu,cpuacct"),
                    "cgroup",
                    ro,
                    Some("cpu,cpuacct")
                ),
                Call::CreateDir(format!("{base}/memory")),
                mount(
                    "cgroup",
                    &format!("{base}/memory"),
                    "cgroup",
                    ro,
                    Some("memory")
                ),
                mount("", base, "", libc::MS_BIND | libc::MS_REMOUNT | ro, None),
            ]
        );
    }
}
