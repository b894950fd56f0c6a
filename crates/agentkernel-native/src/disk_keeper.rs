//! Workspace disks mounted ahead, held by a keeper process between runs.
//!
//! A run with a disk-capped workspace spends about 2.5 ms on its disk even
//! with a loop device attached ahead (`disk_pool.rs`): the ext4 mount
//! (reading the superblock and group descriptors through the loop device)
//! and, right after it, the overlay's first writes to the fresh
//! filesystem, each a block read through the loop device (measured: the
//! overlay mount takes 1.4 ms on a cold filesystem, 0.2 ms on one whose
//! bitmaps and root directory were read once). None of that can be kept
//! warm in a file: a block device's cache goes when its last opener
//! closes it. So a process keeps them open.
//!
//! The keeper (`agentkernel pool hold-disks`, started detached by a run's
//! cleanup process, as root only) holds up to [`TARGET`] detached mounts
//! (fsmount) of fresh copies of the size's template, each on an
//! auto-clearing loop device whose image file is unlinked as soon as it is
//! mounted, and each warmed (a directory made and removed at its root, the
//! overlay's work directory read). It hands each mount to one run at a
//! time over `<state>/disk-pool/held/sock` (0600 in 0700 directories, and
//! the peer must be the keeper's own user). A run that gets none mounts a
//! disk as without a keeper.
//!
//! A one-shot run's cleanup process gives its disk back once the sandbox
//! is gone ([`give_back`]), and the keeper recycles it ([`recycle`]): the
//! overlay's directories are replaced by new, empty ones and the old ones
//! removed, and the disk must then look exactly like a fresh one. That
//! costs ~0.3 ms of the keeper's time where a new disk (the template's
//! copy, a loop device, the ext4 mount and its warming, and the used
//! one's unmount and removal) cost the host ~1.5 ms of every run back to
//! back. A disk its run left much on is dropped instead. It holds fresh network
//! namespaces the same way ([`take_netns`]): creating one is the step of a
//! start-up init waits for longest once the disk is ready.
//!
//! Nothing outlives the keeper: its mounts are descriptors, so when it
//! exits or is killed they are unmounted, their loop devices clear
//! themselves and the unlinked images' space is freed. It exits after
//! [`IDLE`] without a request, when its state directory is deleted, or
//! when `agentkernel pool prune` asks. `AGENTKERNEL_DISK_KEEPER=off`
//! keeps no process between runs (the file-backed pool of `disk_pool.rs`
//! serves instead).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::process::channel::{recv_message, send_message};

/// How many mounted disks the keeper holds ready.
pub const TARGET: usize = 2;
/// The keeper exits after this long without a request.
pub const IDLE: Duration = Duration::from_secs(60);
/// The environment variable that turns the keeper off (`off`).
pub const SWITCH: &str = "AGENTKERNEL_DISK_KEEPER";
/// The keeper's directory under the state root.
const DIR: &str = "disk-pool/held";
const SOCKET: &str = "sock";
const LOCK: &str = "lock";
/// Prefix of an image being copied and mounted (unlinked once mounted).
const IMAGE_PREFIX: &str = ".image-";
/// ext4's `f_type`.
const EXT4_SUPER_MAGIC: i64 = 0xEF53;
/// `lo_file_name` of the loop device under every disk the keeper makes:
/// it recycles only those (a run whose request found none ready mounts a
/// disk of its own, and that one goes with its run: the keeper's devices
/// are all bound to its images, `disk-pool/held/.image-*`).
const DISK_MARKER: &[u8] = b"agentkernel-held";
/// The request that asks the keeper to exit.
const QUIT: u64 = 0;
/// The request for [`Status`].
const STATUS: u64 = u64::MAX;
/// The request for a network namespace ([`take_netns`]).
const NETNS: u64 = u64::MAX - 1;
/// How many fresh network namespaces the keeper holds ready.
pub const NETNS_TARGET: usize = 2;
/// The request that gives a used disk back ([`give_back`]).
const RETURN: u64 = u64::MAX - 2;
/// After a run took a disk, how long the maker waits for a used one to
/// come back before it makes a new one: back to back, a run's disk is
/// returned a few milliseconds after the run ends, and recycling it is far
/// cheaper than a new copy.
const RETURN_WAIT: Duration = Duration::from_millis(50);
/// A used disk is recycled only if its run left at most this many files
/// and blocks (of 4 KiB) on it: removing a large tree file by file costs
/// more than dropping the disk (its image is freed whole) for a new one.
const RECYCLE_MAX_FILES: u64 = 10_000;
const RECYCLE_MAX_BLOCKS: u64 = 65_536;
/// Prefix of a used disk's overlay directories while they are removed.
const TRASH_PREFIX: &str = ".trash-";

fn dir(state_root: &Path) -> PathBuf {
    state_root.join(DIR)
}

/// The name of the keeper's directory inside the pool's (`disk_pool.rs`
/// leaves it alone).
pub const DIR_NAME: &str = "held";

/// Whether runs use (and start) a keeper: as root, unless switched off.
/// A value [`check_switch`] refuses keeps none.
pub fn enabled() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && switched_on() == Ok(true)
}

/// [`SWITCH`]: unset, `on` or `1` is on; `off` or `0` is off; anything else
/// is the value itself, an error.
fn switched_on() -> Result<bool, String> {
    match std::env::var(SWITCH) {
        Err(_) => Ok(true),
        Ok(v) if v == "on" || v == "1" => Ok(true),
        Ok(v) if v == "off" || v == "0" => Ok(false),
        Ok(v) => Err(v),
    }
}

/// A run refuses a [`SWITCH`] value it does not know (a typo of `off`
/// would otherwise keep the very process it meant to turn off).
pub fn check_switch() -> agentkernel_core::Result<()> {
    switched_on().map(drop).map_err(|value| {
        agentkernel_core::Error::invalid(
            "AGENTKERNEL_DISK_KEEPER value",
            value,
            "use on or off, or unset it",
        )
    })
}

/// True when a keeper of `state_root` is alive (it holds its lock).
pub fn serving(state_root: &Path) -> bool {
    let Ok(lock) = std::fs::File::open(dir(state_root).join(LOCK)) else {
        return false;
    };
    // SAFETY: flock on an fd we own; released when it closes.
    let free = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0;
    !free
}

/// Takes one mounted disk of `bytes` from the keeper of `state_root`: a
/// detached mount (fsmount) of an empty ext4 filesystem that no one else
/// has or will have. None when there is no keeper, it has none ready, or
/// it holds another size (it switches to `bytes` for the next runs).
pub fn take(state_root: &Path, bytes: u64) -> Option<OwnedFd> {
    request_fd(state_root, bytes).filter(is_ext4)
}

/// Sends `request` to the keeper of `state_root`; the one fd it answers
/// with, if any.
fn request_fd(state_root: &Path, request: u64) -> Option<OwnedFd> {
    Asked::send(state_root, request)?.answer()
}

/// A request sent to the keeper whose answer is read later: the keeper
/// works on it while the asker does something else.
pub struct Asked(UnixStream);

impl Asked {
    fn send(state_root: &Path, request: u64) -> Option<Asked> {
        let stream = connect(state_root).ok()?;
        (&stream).write_all(&request.to_le_bytes()).ok()?;
        Some(Asked(stream))
    }

    /// The descriptor the keeper answered with, if it had one.
    fn answer(self) -> Option<OwnedFd> {
        let (answer, mut fds) = recv_message(&OwnedFd::from(self.0)).ok()?;
        fds.pop().filter(|_| answer == 1 && fds.is_empty())
    }

    /// The answer to [`ask_netns`]: a fresh network namespace, or None.
    pub fn netns(self) -> Option<OwnedFd> {
        self.answer().filter(is_netns)
    }

    /// [`Asked::netns`] if the keeper has answered already (without
    /// waiting); the request back if it has not.
    pub fn netns_if_answered(self) -> Result<Option<OwnedFd>, Asked> {
        let mut ready = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own, a zero timeout.
        if unsafe { libc::poll(&mut ready, 1, 0) } == 1 {
            Ok(self.netns())
        } else {
            Err(self)
        }
    }
}

/// Gives a run's disk back to the keeper of `state_root` once nothing of
/// the sandbox is left (its init has exited), for the keeper to recycle:
/// see [`recycle`]. Without a keeper (or if it does not answer) the disk
/// is simply dropped, which unmounts it.
pub fn give_back(state_root: &Path, disk: OwnedFd) {
    let Ok(stream) = connect(state_root) else {
        return;
    };
    if (&stream).write_all(&RETURN.to_le_bytes()).is_ok() {
        let _ = send_message(&OwnedFd::from(stream), 1, &[disk.as_raw_fd()]);
    }
}

/// Asks the keeper of `state_root` for a fresh network namespace: one it
/// created (nothing but loopback, up) and never entered again, handed to
/// this run alone (creating one costs a run ~0.3–1 ms, which init waits
/// for). The request goes now and the namespace comes from [`Asked::netns`]
/// later: a run asks before it forks init, so the keeper's answer is there
/// by the time init needs it.
pub fn ask_netns(state_root: &Path) -> Option<Asked> {
    Asked::send(state_root, NETNS)
}

fn is_netns(fd: &OwnedFd) -> bool {
    // From <linux/nsfs.h>: _IO(0xb7, 0x3).
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: an ioctl without argument on an fd we own.
    unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) == libc::CLONE_NEWNET }
}

/// A live keeper, as `pool status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub pid: u32,
    /// Mounted disks ready for runs.
    pub ready: usize,
    /// Their size (the last one a run asked for).
    pub bytes: u64,
    /// Fresh network namespaces ready for runs.
    pub netns: usize,
    /// Used disks made ready again, since it started.
    pub recycled: u64,
}

/// The keeper of `state_root`, if one answers.
pub fn status(state_root: &Path) -> Option<Status> {
    let stream = connect(state_root).ok()?;
    let pid = peer_pid(&stream).ok()?;
    let mut request = &stream;
    request.write_all(&STATUS.to_le_bytes()).ok()?;
    let mut answer = [0u8; 32];
    (&stream).read_exact(&mut answer).ok()?;
    let field =
        |i: usize| u64::from_le_bytes(answer[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    Some(Status {
        pid,
        ready: field(0) as usize,
        bytes: field(1),
        netns: field(2) as usize,
        recycled: field(3),
    })
}

/// Asks the keeper of `state_root`, if any, to exit, and waits until it
/// has (its mounts are gone with it): how many mounted disks it let go.
pub fn stop(state_root: &Path) -> usize {
    let Ok(stream) = connect(state_root) else {
        return 0;
    };
    // It answers once its mounts are let go, after a disk it may be making.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut request = &stream;
    if request.write_all(&QUIT.to_le_bytes()).is_err() {
        return 0;
    }
    let mut count = [0u8; 1];
    let mut answer = &stream;
    let released = answer
        .read_exact(&mut count)
        .map_or(0, |()| count[0] as usize);
    let deadline = Instant::now() + Duration::from_secs(10);
    while serving(state_root) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    released
}

/// Removes the image files a killed keeper was copying (gc), unless a
/// keeper is alive (it removes them itself when it starts): how many.
pub fn collect(state_root: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir(state_root)) else {
        return 0;
    };
    if serving(state_root) {
        return 0;
    }
    // `.image-<pid>.<n>`: one whose maker lives may be a keeper starting.
    let dead_maker = |name: &str| {
        name.strip_prefix(IMAGE_PREFIX)
            .and_then(|rest| rest.split('.').next())
            .is_some_and(|pid| !Path::new("/proc").join(pid).exists())
    };
    entries
        .flatten()
        .filter(|e| dead_maker(&e.file_name().to_string_lossy()))
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

/// Starts a keeper of `state_root` for disks of `bytes`, detached, unless
/// one is alive (it switches sizes on request). Failure to start is
/// ignored: runs then mount their disks themselves.
pub fn start(state_root: &Path, bytes: u64) {
    if serving(state_root) {
        return;
    }
    // Its own session: out of the caller's terminal and its Ctrl-C.
    agentkernel_core::detached::spawn(
        state_root,
        &["pool", "hold-disks", "--bytes", &bytes.to_string()],
    );
}

fn connect(state_root: &Path) -> io::Result<UnixStream> {
    let stream = UnixStream::connect(dir(state_root).join(SOCKET))?;
    // The keeper answers from a list in memory; a stuck one is no keeper.
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.set_write_timeout(Some(Duration::from_millis(500)))?;
    // Only a keeper of our own user: anyone else could hand us a filesystem.
    if peer_uid(&stream)? != current_uid() {
        return Err(io::Error::other("the disk keeper's socket is not ours"));
    }
    Ok(stream)
}

fn current_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    peer_cred(stream).map(|c| c.uid)
}

fn peer_pid(stream: &UnixStream) -> io::Result<u32> {
    peer_cred(stream).map(|c| c.pid as u32)
}

fn peer_cred(stream: &UnixStream) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the size we pass.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

fn is_ext4(fd: &OwnedFd) -> bool {
    // SAFETY: fstatfs fills the struct we pass.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above, on an fd we own.
    unsafe {
        libc::fstatfs(fd.as_raw_fd(), &mut stat) == 0 && stat.f_type as i64 == EXT4_SUPER_MAGIC
    }
}

/// What the keeper's two threads share.
struct Held {
    /// The size the ready disks have (the last one a run asked for).
    bytes: u64,
    ready: VecDeque<OwnedFd>,
    /// Disks runs gave back, to be recycled (or dropped when enough are
    /// ready).
    returned: VecDeque<OwnedFd>,
    /// What a fresh disk of `bytes` looks like, taken from the first one
    /// made: a recycled one must look exactly the same.
    fresh: Option<Fresh>,
    /// Until when the maker waits for a disk to come back before it makes
    /// a new one (set when a run takes one).
    expect_return_until: Option<Instant>,
    /// Disks recycled so far (`pool status`).
    recycled: u64,
    /// Fresh network namespaces.
    netns: VecDeque<OwnedFd>,
    quit: bool,
}

type Shared = Arc<(Mutex<Held>, Condvar)>;

/// The keeper (`agentkernel pool hold-disks --bytes N`): returns when it
/// has nothing left to do. Another keeper alive: returns at once.
pub fn serve(state_root: &Path, bytes: u64) -> io::Result<()> {
    if !state_root.is_dir() {
        return Ok(());
    }
    let dir = dir(state_root);
    for d in [dir.parent().unwrap_or(&dir), &dir] {
        match std::fs::DirBuilder::new().mode(0o700).create(d) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    // Held until we exit: one keeper per state dir.
    let Some(lock) = crate::disk_pool::try_lock_file(&dir.join(LOCK))? else {
        return Ok(());
    };
    // Under the lock: what a killed keeper left (its socket, an image it
    // was copying) is ours to remove.
    for entry in std::fs::read_dir(&dir)?.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(IMAGE_PREFIX)
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let socket = dir.join(SOCKET);
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    // The devices the file-backed pool attached ahead are not needed now.
    crate::disk_pool::drain(state_root);

    let shared: Shared = Arc::new((
        Mutex::new(Held {
            bytes,
            ready: VecDeque::new(),
            returned: VecDeque::new(),
            fresh: None,
            expect_return_until: None,
            recycled: 0,
            netns: VecDeque::new(),
            quit: false,
        }),
        Condvar::new(),
    ));
    let maker = {
        let shared = shared.clone();
        let state_root = state_root.to_path_buf();
        std::thread::spawn(move || make_disks(&state_root, &shared))
    };
    let released = accept_requests(&listener, &socket, &shared);
    {
        let (held, wake) = &*shared;
        let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
        held.quit = true;
        held.ready.clear();
        held.returned.clear();
        held.netns.clear();
        wake.notify_all();
    }
    let _ = maker.join();
    let _ = std::fs::remove_file(&socket);
    // A prune waits for our lock; it goes once everything is let go.
    if let Some(stream) = released {
        let mut answer = &stream.0;
        let _ = answer.write_all(&[stream.1.min(255) as u8]);
    }
    drop(lock);
    Ok(())
}

/// Serves requests until idle, deleted, or asked to quit; on a quit, the
/// asker's connection and how many disks we held, to answer once they are
/// let go.
fn accept_requests(
    listener: &UnixListener,
    socket: &Path,
    shared: &Shared,
) -> Option<(UnixStream, usize)> {
    let mut last_request = Instant::now();
    loop {
        let mut poll = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own; a one-second tick to notice idleness
        // and a deleted state directory.
        let ready = unsafe { libc::poll(&mut poll, 1, 1000) };
        if ready <= 0 {
            let maker_gave_up = shared.0.lock().map_or(true, |held| held.quit);
            if last_request.elapsed() >= IDLE || !socket.exists() || maker_gave_up {
                return None;
            }
            continue;
        }
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        last_request = Instant::now();
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        // Anyone but our own user is not answered at all.
        if peer_uid(&stream).ok() != Some(current_uid()) {
            continue;
        }
        let mut request = [0u8; 8];
        if (&stream).read_exact(&mut request).is_err() {
            continue;
        }
        let wanted = u64::from_le_bytes(request);
        let (held, wake) = &**shared;
        let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
        if wanted == QUIT {
            let count = held.ready.len();
            return Some((stream, count));
        }
        if wanted == NETNS {
            let netns = held.netns.pop_front();
            wake.notify_all();
            drop(held);
            let fds: Vec<_> = netns.iter().map(AsRawFd::as_raw_fd).collect();
            // Ours goes when `netns` drops: never handed out twice.
            let _ = send_message(&OwnedFd::from(stream), u8::from(netns.is_some()), &fds);
            continue;
        }
        if wanted == RETURN {
            drop(held);
            let stream = OwnedFd::from(stream);
            let Ok((1, mut fds)) = recv_message(&stream) else {
                continue;
            };
            let disk = fds.pop().filter(|d| fds.is_empty() && is_ext4(d));
            let mut held = shared.0.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(disk) = disk.filter(|_| !held.quit) {
                held.returned.push_back(disk);
                wake.notify_all();
            }
            continue;
        }
        if wanted == STATUS {
            let mut answer = (held.ready.len() as u64).to_le_bytes().to_vec();
            answer.extend_from_slice(&held.bytes.to_le_bytes());
            answer.extend_from_slice(&(held.netns.len() as u64).to_le_bytes());
            answer.extend_from_slice(&held.recycled.to_le_bytes());
            drop(held);
            let _ = (&stream).write_all(&answer);
            continue;
        }
        let disk = if held.bytes == wanted {
            held.ready.pop_front()
        } else {
            // Runs now want another size: ours are of no use.
            held.bytes = wanted;
            held.ready.clear();
            held.returned.clear();
            held.fresh = None;
            None
        };
        held.expect_return_until = Some(Instant::now() + RETURN_WAIT);
        wake.notify_all();
        drop(held);
        let fds: Vec<_> = disk.iter().map(AsRawFd::as_raw_fd).collect();
        // Ours goes when `disk` drops, sent or not: never in two runs at
        // once (a run gives it back only once its sandbox is gone).
        let _ = send_message(&OwnedFd::from(stream), u8::from(disk.is_some()), &fds);
    }
}

/// What the maker thread does next.
enum Work {
    Netns,
    /// A used disk to recycle, for disks of `bytes` that look like `fresh`.
    Recycle {
        disk: OwnedFd,
        bytes: u64,
        fresh: Option<Fresh>,
    },
    Make(u64),
    /// Used disks not needed (enough are ready): dropped, i.e. unmounted,
    /// here rather than under the lock.
    Drop(Vec<OwnedFd>),
}

/// The maker thread: keeps [`TARGET`] disks of the wanted size and
/// [`NETNS_TARGET`] network namespaces ready (namespaces first: they are
/// quick to make), recycling disks runs gave back before it makes new ones.
/// Three failures in a row (no template, no loop device, no new mount API)
/// end the keeper: runs then do without it.
fn make_disks(state_root: &Path, shared: &Shared) {
    crate::sys::lower_priority_of_this_thread();
    let (held, wake) = &**shared;
    let mut failures = 0;
    let mut netns_failures = 0;
    let mut serial = 0u64;
    loop {
        let work = {
            let mut guard = held.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if guard.quit {
                    return;
                }
                if guard.netns.len() < NETNS_TARGET {
                    break Work::Netns;
                }
                if guard.ready.len() >= TARGET && !guard.returned.is_empty() {
                    break Work::Drop(guard.returned.drain(..).collect());
                }
                if guard.ready.len() < TARGET {
                    if let Some(disk) = guard.returned.pop_front() {
                        break Work::Recycle {
                            disk,
                            bytes: guard.bytes,
                            fresh: guard.fresh,
                        };
                    }
                    let now = Instant::now();
                    match guard.expect_return_until {
                        // A run's disk may be on its way back: wait for it,
                        // while one is ready for the next run.
                        Some(until) if until > now && !guard.ready.is_empty() => {
                            guard = wake
                                .wait_timeout(guard, until - now)
                                .unwrap_or_else(|e| e.into_inner())
                                .0;
                            continue;
                        }
                        _ => break Work::Make(guard.bytes),
                    }
                }
                guard = wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
        };
        match work {
            Work::Netns => match make_netns() {
                Ok(netns) => {
                    netns_failures = 0;
                    let mut guard = held.lock().unwrap_or_else(|e| e.into_inner());
                    if !guard.quit {
                        guard.netns.push_back(netns);
                    }
                }
                Err(_) => {
                    netns_failures += 1;
                    if netns_failures >= 3 {
                        held.lock().unwrap_or_else(|e| e.into_inner()).quit = true;
                        return;
                    }
                }
            },
            Work::Drop(disks) => drop(disks),
            Work::Recycle { disk, bytes, fresh } => {
                serial += 1;
                // A disk that does not come back exactly as fresh is dropped.
                if let Some(disk) = fresh.and_then(|fresh| recycle(disk, &fresh, serial).ok()) {
                    let mut guard = held.lock().unwrap_or_else(|e| e.into_inner());
                    if guard.bytes == bytes && !guard.quit {
                        guard.ready.push_back(disk);
                        guard.recycled += 1;
                    }
                }
            }
            Work::Make(bytes) => {
                serial += 1;
                match make_disk(state_root, bytes, serial) {
                    Ok((disk, fresh)) => {
                        failures = 0;
                        let mut guard = held.lock().unwrap_or_else(|e| e.into_inner());
                        if guard.bytes == bytes && !guard.quit {
                            guard.ready.push_back(disk);
                            guard.fresh.get_or_insert(fresh);
                        }
                    }
                    Err(_) => {
                        failures += 1;
                        if failures >= 3 {
                            let mut guard = held.lock().unwrap_or_else(|e| e.into_inner());
                            guard.quit = true;
                            // The acceptor notices on its next tick.
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
        }
    }
}

/// A fresh network namespace with loopback up (all a `--no-network`
/// sandbox has; a network's link would bring it up anyway): made by a
/// thread that unshares into it and exits, so nothing of ours ever runs in
/// it; only the fd keeps it.
fn make_netns() -> io::Result<OwnedFd> {
    std::thread::spawn(|| -> io::Result<OwnedFd> {
        // SAFETY: unshare of this short-lived thread's own namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        crate::net::loopback_up()?;
        crate::net::no_ipv6_on_new_links()?;
        Ok(std::fs::File::open("/proc/thread-self/ns/net")?.into())
    })
    .join()
    .map_err(|_| io::Error::other("the namespace thread panicked"))?
}

/// One fresh disk: the template copied, mounted detached on an
/// auto-clearing loop device, its file unlinked, and warmed; with what it
/// looks like.
fn make_disk(state_root: &Path, bytes: u64, serial: u64) -> io::Result<(OwnedFd, Fresh)> {
    let template = crate::disk::template_path(state_root, bytes);
    let image = dir(state_root).join(format!("{IMAGE_PREFIX}{}.{serial}", std::process::id()));
    let mounted = crate::disk::sparse_copy(&template, &image, bytes)
        .and_then(|()| crate::disk::mount_detached(&image, None, DISK_MARKER));
    // The mount holds the file open: its name is no longer needed.
    let _ = std::fs::remove_file(&image);
    let mount = mounted?;
    warm(&mount)?;
    let fresh = Fresh::of(&mount)?;
    Ok((mount, fresh))
}

/// What a disk looks like: its filesystem's counts of blocks and inodes,
/// in all and free, and the owner and mode of the overlay's directories
/// at its root (the workspace's root takes the upper one's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fresh {
    blocks: u64,
    free_blocks: u64,
    files: u64,
    free_files: u64,
    /// (mode, uid, gid) of `cow0-upper` and `cow0-work`.
    dirs: [(u32, u32, u32); 2],
}

impl Fresh {
    fn of(disk: &OwnedFd) -> io::Result<Fresh> {
        // SAFETY: fstatfs fills the struct we pass, on an fd we own.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstatfs(disk.as_raw_fd(), &mut fs) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut dirs = [(0, 0, 0); 2];
        for (slot, name) in dirs.iter_mut().zip(overlay_dirs()) {
            let meta =
                rustix::fs::statat(disk, name.as_str(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW)?;
            *slot = (meta.st_mode, meta.st_uid, meta.st_gid);
        }
        Ok(Fresh {
            blocks: fs.f_blocks,
            free_blocks: fs.f_bfree,
            files: fs.f_files,
            free_files: fs.f_ffree,
            dirs,
        })
    }
}

/// The overlay's directories at a disk's root (its only contents but
/// ext4's own `lost+found`).
fn overlay_dirs() -> [String; 2] {
    crate::rootfs::copy_on_write_dirs(0)
}

/// Makes a disk a run gave back as good as a fresh one, or fails (the
/// disk is then dropped): only a disk the keeper made ([`DISK_MARKER`]).
/// The run's sandbox is gone (its init has exited,
/// so no process of it is left), and all it could write is in the
/// overlay's two directories: they are renamed away, made anew with the
/// fresh disk's owner and mode, and removed; free space goes back to the
/// host (FITRIM punches the freed blocks out of the image); and the disk
/// must then look exactly like a fresh one — the same free blocks and
/// inodes, so nothing of the run is left on it anywhere, and the same
/// directories. Should anything still hold the old directories (a mount
/// namespace pinned from outside), they are deleted directories by then:
/// nothing can be created in them, and the next run's are new ones.
fn recycle(used: OwnedFd, fresh: &Fresh, serial: u64) -> io::Result<OwnedFd> {
    use rustix::fs::{AtFlags, Mode};
    if !crate::disk::loop_named(&used, DISK_MARKER)? {
        return Err(io::Error::other("a disk the keeper did not make"));
    }
    let left = Fresh::of(&used)?;
    if left.blocks != fresh.blocks
        || fresh.free_files.saturating_sub(left.free_files) > RECYCLE_MAX_FILES
        || fresh.free_blocks.saturating_sub(left.free_blocks) > RECYCLE_MAX_BLOCKS
    {
        return Err(io::Error::other(
            "the run left too much on its disk to recycle it",
        ));
    }
    // The run's mount was attached in its sandbox and cannot be again: a
    // new detached mount of the same filesystem replaces it.
    let disk = crate::disk::remount_detached(&used)?;
    drop(used);
    let root = PathBuf::from(format!("/proc/self/fd/{}", disk.as_raw_fd()));
    for (i, (name, &(mode, uid, gid))) in overlay_dirs().iter().zip(&fresh.dirs).enumerate() {
        let trash = format!("{TRASH_PREFIX}{serial}.{i}");
        rustix::fs::renameat(&disk, name.as_str(), &disk, trash.as_str())?;
        rustix::fs::mkdirat(&disk, name.as_str(), Mode::from_raw_mode(0o700))?;
        rustix::fs::chownat(
            &disk,
            name.as_str(),
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        rustix::fs::chmodat(
            &disk,
            name.as_str(),
            Mode::from_raw_mode(mode & 0o7777),
            AtFlags::empty(),
        )?;
        agentkernel_core::state::remove_tree(&root.join(&trash))
            .map_err(|e| io::Error::other(e.to_string()))?;
    }
    trim(&disk);
    if Fresh::of(&disk)? != *fresh {
        return Err(io::Error::other("the used disk does not look fresh"));
    }
    Ok(disk)
}

/// Discards the filesystem's free blocks (FITRIM), which the loop device
/// turns into holes in its image: what a run wrote and deleted does not
/// keep the host's space. Best effort.
fn trim(disk: &OwnedFd) {
    #[repr(C)]
    struct FstrimRange {
        start: u64,
        len: u64,
        minlen: u64,
    }
    // From <linux/fs.h>: _IOWR('X', 121, struct fstrim_range).
    const FITRIM: libc::c_ulong = 0xc018_5879;
    let mut range = FstrimRange {
        start: 0,
        len: u64::MAX,
        minlen: 0,
    };
    // The mount's fd is a path only: ioctls need the root opened.
    let Ok(root) = rustix::fs::openat(
        disk,
        ".",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    ) else {
        return;
    };
    // SAFETY: FITRIM reads and writes the range struct we pass.
    unsafe { libc::ioctl(root.as_raw_fd(), FITRIM as _, &mut range) };
}

/// Reads what a run's first writes need (block and inode bitmaps, the root
/// directory, the overlay's work directory) into the device's cache, by
/// making and removing a directory at the root.
fn warm(mount: &OwnedFd) -> io::Result<()> {
    let name = c".warm";
    // SAFETY: *at calls relative to our mount's root fd with C strings.
    unsafe {
        if libc::mkdirat(mount.as_raw_fd(), name.as_ptr(), 0o700) != 0
            || libc::unlinkat(mount.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) != 0
        {
            return Err(io::Error::last_os_error());
        }
        let work = libc::openat(
            mount.as_raw_fd(),
            c"cow0-work".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        if work >= 0 {
            let work = OwnedFd::from_raw_fd(work);
            let mut buf = [0u8; 1024];
            libc::syscall(
                libc::SYS_getdents64,
                work.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            );
        }
    }
    Ok(())
}
