//! The disk cap of the copy-on-write workspace (`--disk`).
//!
//! The workspace's writable layer is on disk (builds write a lot there, too
//! much to charge to the sandbox's memory as the root's tmpfs layer is). A
//! plain directory on the host's filesystem has no size limit that works
//! everywhere: project quotas need XFS or an ext4 built with them, and a
//! kernel with quota support. So the layer lives in a file of its own: a
//! sparse ext4 image of exactly the cap, loop-mounted inside the sandbox's
//! private mount namespace. Writes past the cap fail with ENOSPC in the
//! sandbox; the host file can never grow beyond the cap.
//!
//! Cost per run: the image is a sparse copy of a template formatted once per
//! size (`<state>/disk-templates/`, a few hundred KiB of metadata), then one
//! loop device and one mount, made by a supervisor thread in parallel with
//! init's set-up ([`mount_detached`]). The loop device is configured with
//! `LO_FLAGS_AUTOCLEAR`: it detaches itself when the last reference to the
//! mount goes (the sandbox's mount namespace, the supervisor's mount fd,
//! which a one-shot run's cleanup process closes), even after a `kill -9`;
//! the image file goes with the scratch directory.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use agentkernel_core::{Error, Result};

use crate::sys::context;

/// Name of the workspace image inside a sandbox's scratch directory.
pub const IMAGE_NAME: &str = "workspace.ext4";
/// Where the image is mounted inside the scratch directory (in the sandbox's
/// mount namespace only).
pub const MOUNT_NAME: &str = "workspace-disk";

/// Creates `<scratch>/workspace.ext4`, an empty ext4 filesystem of `bytes`
/// copied from `template`, and the directory it is mounted on.
pub fn create_workspace_image(template: &Path, scratch: &Path, bytes: u64) -> Result<PathBuf> {
    let image = scratch.join(IMAGE_NAME);
    sparse_copy(template, &image, bytes).map_err(|e| Error::state(&image, e))?;
    let mount_point = scratch.join(MOUNT_NAME);
    std::fs::create_dir(&mount_point).map_err(|e| Error::state(&mount_point, e))?;
    Ok(image)
}

/// The mount point of a disk the keeper holds (disk_keeper.rs), and the
/// path its image gets if the keeper has none ready ([`mount_for_run`]).
pub fn prepare_held_image(scratch: &Path) -> Result<PathBuf> {
    let mount_point = scratch.join(MOUNT_NAME);
    std::fs::create_dir(&mount_point).map_err(|e| Error::state(&mount_point, e))?;
    Ok(scratch.join(IMAGE_NAME))
}

/// Where a run's workspace disk comes from, decided by `prepare`.
pub enum DiskSource {
    /// The keeper's, else `image` made from the template of `bytes` in
    /// `state_root`.
    Held { state_root: PathBuf, bytes: u64 },
    /// `image`, already made, on this pooled device if any.
    Image { pooled: Option<String> },
}

/// The run's workspace disk, mounted detached (see [`mount_detached`]).
pub fn mount_for_run(image: &Path, source: DiskSource) -> io::Result<OwnedFd> {
    match source {
        DiskSource::Held { state_root, bytes } => {
            if let Some(mount) = crate::disk_keeper::take(&state_root, bytes) {
                crate::trace::phase("disk: held mount taken");
                return Ok(mount);
            }
            sparse_copy(&template_path(&state_root, bytes), image, bytes)?;
            mount_detached(image, None, b"")
        }
        DiskSource::Image { pooled } => mount_detached(image, pooled.as_deref(), b""),
    }
}

/// `<scratch>/workspace.ext4` and its mount point from the pool of devices
/// attached ahead (disk_pool.rs): the image and its device, or None when
/// the pool has none of this size.
pub fn claim_workspace_image(
    state_root: &Path,
    scratch: &Path,
    bytes: u64,
) -> io::Result<Option<(PathBuf, String)>> {
    let image = scratch.join(IMAGE_NAME);
    let Some(device) = crate::disk_pool::claim(state_root, &image, bytes) else {
        return Ok(None);
    };
    std::fs::create_dir(scratch.join(MOUNT_NAME))?;
    Ok(Some((image, device)))
}

/// The version of the template's layout (`run_mkfs`), in its name: a
/// state directory made by an older agentkernel gets a new template, and
/// its old one is removed then.
const TEMPLATE_LAYOUT: &str = "v2";

/// Where the template of this size is (made by [`template`]).
pub fn template_path(state_root: &Path, bytes: u64) -> PathBuf {
    state_root
        .join("disk-templates")
        .join(format!("ext4-{bytes}-{TEMPLATE_LAYOUT}"))
}

/// The formatted, empty template of this size, made once per state directory.
pub fn template(state_root: &Path, bytes: u64) -> Result<PathBuf> {
    let path = template_path(state_root, bytes);
    let dir = state_root.join("disk-templates");
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::state(&dir, e))?;
    // Formatted under a temporary name and renamed: concurrent first runs
    // each format their own and the last rename wins, never a half file.
    let tmp = dir.join(format!(".ext4-{bytes}.{}", std::process::id()));
    let result = format(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, &path).map_err(|e| Error::state(&path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    // The first layout's template, unversioned.
    let _ = std::fs::remove_file(dir.join(format!("ext4-{bytes}")));
    result.map(|()| path)
}

fn format(path: &Path, bytes: u64) -> Result<()> {
    let file = File::create(path).map_err(|e| Error::state(path, e))?;
    file.set_len(bytes).map_err(|e| Error::state(path, e))?;
    drop(file);
    // Beside the image, under its unique temporary name: concurrent first
    // runs each format their own.
    let mut contents = path.as_os_str().to_owned();
    contents.push(".contents");
    let contents = PathBuf::from(contents);
    let _ = std::fs::remove_dir_all(&contents);
    // The workspace's overlay directories are made in the template, so a
    // run does not make them: a directory made in a freshly mounted ext4
    // allocates its first block, and that first allocation loads the block
    // allocator's state, on the sandbox's start-up path. The workspace is
    // always the sandbox's first mount (prepare.rs).
    let made = std::fs::create_dir(&contents).and_then(|()| {
        crate::rootfs::copy_on_write_dirs(0)
            .iter()
            .try_for_each(|d| std::fs::create_dir(contents.join(d)))
    });
    let result = made
        .map_err(|e| Error::state(&contents, e))
        .and_then(|()| run_mkfs(path, &contents, bytes));
    let _ = std::fs::remove_dir_all(&contents);
    result
}

/// mke2fs's `-G`: block groups per flex group, enough for all of them, so
/// that every group's bitmaps and inode table sit together at the start.
fn flex_groups(bytes: u64) -> u64 {
    // 32768 blocks of 4 KiB per group.
    let groups = bytes.div_ceil(32768 * 4096).max(1);
    groups.next_power_of_two().max(16)
}

fn run_mkfs(path: &Path, contents: &Path, bytes: u64) -> Result<()> {
    // No journal (the layer is thrown away with the sandbox, and a journal
    // would be written on every run), lazily initialised inode tables (they
    // stay holes: the mount uses `noinit_itable`), no reserved blocks. Group
    // descriptors checksummed with uninit_bg's crc16 instead of
    // metadata_csum's crc32c: ext4 needs crc32c only as a soft module
    // dependency, which a kernel without modprobe (a minimal VM) never
    // loads, and the mount then fails with ENOENT.
    // The fewer places of the image hold data, the cheaper each run's copy
    // of the template and, above all, its removal: on a filesystem mounted
    // with `discard`, every freed extent is trimmed at once. So no backup
    // superblocks (`sparse_super2` with none: the layer is thrown away, a
    // damaged one is never repaired) and one flex group holding all the
    // groups' metadata: 4 extents of data instead of 16 for 10 GiB. On a
    // host whose `/` has `discard`, a run's cleanup went from ~1.9 to ~1.0 ms
    // to remove its scratch, and the pool's refill from ~1.4 to ~0.7 ms.
    let flex = flex_groups(bytes).to_string();
    let out = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-m",
            "0",
            "-G",
            &flex,
            "-O",
            "^has_journal,^resize_inode,^metadata_csum,uninit_bg,sparse_super2",
            "-E",
            "lazy_itable_init=1,nodiscard,root_owner=0:0,num_backup_sb=0",
            "-L",
            "agentkernel-ws",
            "-d",
        ])
        .arg(contents)
        .arg(path)
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(Error::Backend {
            backend: "native",
            message: format!(
                "mkfs.ext4 failed to format the workspace's disk-capped layer: {}; check that e2fsprogs works, or run without a cap: --disk is needed for the copy-on-write workspace",
                String::from_utf8_lossy(&o.stderr).trim().replace('\n', " ")
            ),
        }),
        Err(e) => Err(Error::Backend {
            backend: "native",
            message: format!(
                "cannot run mkfs.ext4 ({e}) to cap the copy-on-write workspace's disk use; install e2fsprogs"
            ),
        }),
    }
}

/// Copies `from` to a new file `to` of `len` bytes, copying only the data
/// extents (SEEK_DATA/SEEK_HOLE): the holes stay holes.
pub(crate) fn sparse_copy(from: &Path, to: &Path, len: u64) -> io::Result<()> {
    let src = File::open(from)?;
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)?;
    dst.set_len(len)?;
    let (s, d) = (src.as_raw_fd(), dst.as_raw_fd());
    let mut offset: libc::off_t = 0;
    loop {
        // SAFETY: plain lseek on an fd we own.
        let data = unsafe { libc::lseek(s, offset, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(()); // no data past `offset`
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(s, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (mut from_off, mut to_off) = (data, data);
        let mut left = (hole - data) as usize;
        while left > 0 {
            // SAFETY: offsets point to locals; the fds are ours.
            let n = unsafe { libc::copy_file_range(s, &mut from_off, d, &mut to_off, left, 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                break;
            }
            left -= n as usize;
        }
        offset = hole;
    }
}

// From <linux/loop.h>: the kernel ABI, stable since Linux 5.8 for
// LOOP_CONFIGURE (older kernels: LOOP_SET_FD + LOOP_SET_STATUS64).
const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
pub(crate) const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_NAME_SIZE: usize = 64;

#[repr(C)]
pub(crate) struct LoopInfo64 {
    pub device: u64,
    pub inode: u64,
    rdevice: u64,
    offset: u64,
    size_limit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    pub flags: u32,
    pub file_name: [u8; LO_NAME_SIZE],
    crypt_name: [u8; LO_NAME_SIZE],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

impl Default for LoopInfo64 {
    fn default() -> Self {
        LoopInfo64 {
            device: 0,
            inode: 0,
            rdevice: 0,
            offset: 0,
            size_limit: 0,
            number: 0,
            encrypt_type: 0,
            encrypt_key_size: 0,
            flags: 0,
            file_name: [0; LO_NAME_SIZE],
            crypt_name: [0; LO_NAME_SIZE],
            encrypt_key: [0; 32],
            init: [0; 2],
        }
    }
}

/// What a bound loop device says about itself (`LOOP_GET_STATUS64`).
pub(crate) fn loop_status(device: &File) -> io::Result<LoopInfo64> {
    let mut info = LoopInfo64::default();
    // SAFETY: LOOP_GET_STATUS64 writes a `struct loop_info64` we own.
    if unsafe { libc::ioctl(device.as_raw_fd(), LOOP_GET_STATUS64 as _, &mut info) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// `LOOP_CLR_FD`: the device lets its file go now if we are its only
/// opener, else (a mount holds it) when its last opener goes.
pub(crate) fn clear(device: &File) -> io::Result<()> {
    // SAFETY: LOOP_CLR_FD takes no argument.
    if unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CLR_FD as _, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[repr(C)]
#[derive(Default)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Attaches `image` to a free loop device (auto-clearing) and mounts it on
/// `target`. Runs in the sandbox's init, inside its private mount namespace,
/// so the host never sees the mount. (The fallback of [`mount_detached`].)
pub fn mount_workspace_image(image: &Path, target: &Path) -> io::Result<()> {
    let (dev, loop_fd) = attach_loop(image, b"")?;
    // `noinit_itable`: the template's inode tables are holes; without it
    // the kernel would zero them in the background, on the host's disk.
    let mounted = crate::sys::mount(
        &dev,
        &target.to_string_lossy(),
        "ext4",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("noinit_itable"),
    );
    // The mount holds the device now; closing ours lets AUTOCLEAR free it
    // when the mount goes (or right away if the mount failed).
    drop(loop_fd);
    mounted
}

// From <linux/mount.h>: the new mount API (Linux 5.2).
const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// `image` on a loop device, mounted but attached nowhere (fsopen/fsmount):
/// made by a thread of the supervisor, on the host, while init builds its
/// namespaces and root — configuring a loop device waits milliseconds on
/// the block layer, which init need not spend. Init moves the mount into
/// its own mount namespace ([`attach_detached`]); until then it is in no
/// namespace, so the host never sees it, and if everything dies first the
/// mount and (AUTOCLEAR) the loop device go with the last fd. Mounted as
/// [`mount_workspace_image`] mounts it: ext4, `noinit_itable`, nosuid, nodev.
///
/// `pooled` is a device the run claimed from the pool (`disk_pool.rs`),
/// already bound to `image`: used if it still is (else one is attached as
/// without a pool), and set to clear itself once mounted, or let go if the
/// mount fails. A device attached here gets `name` as its `lo_file_name`
/// (see [`loop_named`]).
pub fn mount_detached(image: &Path, pooled: Option<&str>, name: &[u8]) -> io::Result<OwnedFd> {
    let claimed = pooled.and_then(|dev| {
        crate::disk_pool::open_claimed(dev, image)
            .ok()
            .map(|fd| (dev.to_string(), PooledDevice(fd)))
    });
    let (dev, loop_fd) = match claimed {
        Some((dev, pooled)) => (dev, LoopFd::Pooled(pooled)),
        None => {
            let (dev, fd) = attach_loop(image, name)?;
            (dev, LoopFd::Attached(fd))
        }
    };
    crate::trace::phase("disk: loop ready");
    let mount = fsmount_ext4(&dev)?;
    drop(loop_fd); // the mount holds the device now
    Ok(mount)
}

/// A new detached mount of the ext4 filesystem under `used`, a mount that
/// was attached in a sandbox's namespace (which is gone, so the mount can
/// never be attached again): the filesystem is live as long as `used` is
/// held, so mounting its loop device again takes the same one, without
/// reading anything (disk_keeper.rs recycles disks this way).
pub fn remount_detached(used: &OwnedFd) -> io::Result<OwnedFd> {
    fsmount_ext4(&loop_device_of(used)?)
}

/// The loop device a mounted disk is on (`/dev/loopN`).
fn loop_device_of(mount: &OwnedFd) -> io::Result<String> {
    const LOOP_MAJOR: u32 = 7;
    let dev = rustix::fs::fstat(mount)?.st_dev;
    if rustix::fs::major(dev) != LOOP_MAJOR {
        return Err(io::Error::other("the disk is not on a loop device"));
    }
    Ok(format!("/dev/loop{}", rustix::fs::minor(dev)))
}

/// Whether the loop device under a mounted disk was attached with `name`
/// as its `lo_file_name` (see [`mount_detached`]): how the disk keeper
/// tells the disks it made from any other.
pub fn loop_named(mount: &OwnedFd, name: &[u8]) -> io::Result<bool> {
    let device = File::open(loop_device_of(mount)?)?;
    let info = loop_status(&device)?;
    Ok(name.len() < LO_NAME_SIZE
        && info.file_name[..name.len()] == *name
        && info.file_name[name.len()] == 0)
}

/// `dev` mounted as ext4, detached: `noinit_itable`, nosuid, nodev.
fn fsmount_ext4(dev: &str) -> io::Result<OwnedFd> {
    // SAFETY: fsopen with a valid C string; the fd is owned below.
    let fs = unsafe { libc::syscall(libc::SYS_fsopen, c"ext4".as_ptr(), FSOPEN_CLOEXEC) };
    if fs < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, ours.
    let fs = unsafe { OwnedFd::from_raw_fd(fs as RawFd) };
    let source = crate::sys::cstr(dev)?;
    let config = |cmd: libc::c_uint, key: Option<&std::ffi::CStr>, value: *const libc::c_char| {
        let key = key.map_or(std::ptr::null(), |k| k.as_ptr());
        // SAFETY: fsconfig on our fs context with valid C strings (or null).
        if unsafe { libc::syscall(libc::SYS_fsconfig, fs.as_raw_fd(), cmd, key, value, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    config(FSCONFIG_SET_STRING, Some(c"source"), source.as_ptr())?;
    config(FSCONFIG_SET_FLAG, Some(c"noinit_itable"), std::ptr::null())?;
    config(FSCONFIG_CMD_CREATE, None, std::ptr::null())?;
    crate::trace::phase("disk: superblock read");
    // SAFETY: fsmount of a created fs context; the fd is owned below.
    let mount = unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            fs.as_raw_fd(),
            FSMOUNT_CLOEXEC,
            MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        )
    };
    if mount < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, ours.
    Ok(unsafe { OwnedFd::from_raw_fd(mount as RawFd) })
}

/// Our fd of the loop device under a detached mount: one we attached
/// (auto-clearing), or one from the pool, which is made to clear itself
/// when we let it go — whether the mount holds it by then or not.
enum LoopFd {
    Attached(#[allow(dead_code)] File),
    Pooled(#[allow(dead_code)] PooledDevice),
}

struct PooledDevice(File);

impl Drop for PooledDevice {
    fn drop(&mut self) {
        let _ = crate::disk_pool::release(&self.0);
    }
}

/// Attaches a mount from [`mount_detached`] on `target` (in init's mount namespace).
pub fn attach_detached(mount: &OwnedFd, target: &Path) -> io::Result<()> {
    let target = crate::sys::cpath(target)?;
    // SAFETY: move_mount of our mount fd onto a path given as a C string.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mount.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(context("attach the workspace's disk")(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// `image` on a free loop device, configured to clear itself when its last
/// user goes: the device's path and our fd of it.
fn attach_loop(image: &Path, name: &[u8]) -> io::Result<(String, File)> {
    attach_loop_with(image, LO_FLAGS_AUTOCLEAR, name).map(|(dev, _, fd)| (dev, fd))
}

/// `image` on a free loop device with these flags and `lo_file_name`: the
/// device's path, number and our fd of it.
pub(crate) fn attach_loop_with(
    image: &Path,
    flags: u32,
    name: &[u8],
) -> io::Result<(String, u32, File)> {
    let backing = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(context(format_args!("open {}", image.display())))?;
    let control = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(context(
            "open /dev/loop-control (the disk cap of the copy-on-write workspace needs loop devices; `modprobe loop`)",
        ))?;
    // Another process may take the free device between the two calls:
    // configuring it then fails with EBUSY, and we ask again.
    for _ in 0..64 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            return Err(context("find a free loop device")(
                io::Error::last_os_error(),
            ));
        }
        let dev = format!("/dev/loop{n}");
        let loop_fd = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(context(format_args!("open {dev}"))(e)),
        };
        match configure(&loop_fd, &backing, flags, name) {
            Ok(()) => return Ok((dev, n as u32, loop_fd)),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => continue,
            Err(e) => return Err(context(format_args!("attach {dev}"))(e)),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::ResourceBusy,
        "no free loop device for the workspace's disk cap after 64 tries",
    ))
}

fn configure(loop_dev: &File, backing: &File, flags: u32, name: &[u8]) -> io::Result<()> {
    let mut info = LoopInfo64 {
        flags,
        ..LoopInfo64::default()
    };
    let len = name.len().min(LO_NAME_SIZE - 1);
    info.file_name[..len].copy_from_slice(&name[..len]);
    let config = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        info,
        ..LoopConfig::default()
    };
    // SAFETY: LOOP_CONFIGURE reads a `struct loop_config` we own.
    let rc = unsafe { libc::ioctl(loop_dev.as_raw_fd(), LOOP_CONFIGURE as _, &config) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOTTY) {
        return Err(e);
    }
    // Before Linux 5.8: attach, then set the flags.
    // SAFETY: LOOP_SET_FD takes the backing fd as its argument.
    if unsafe { libc::ioctl(loop_dev.as_raw_fd(), LOOP_SET_FD as _, backing.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: LOOP_SET_STATUS64 reads a `struct loop_info64` we own.
    if unsafe { libc::ioctl(loop_dev.as_raw_fd(), LOOP_SET_STATUS64 as _, &config.info) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// The kernel's sizes: struct loop_info64 is 232 bytes, struct loop_config 304.
const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);
