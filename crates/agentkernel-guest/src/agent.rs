//! PID 1 in a sandbox VM. Mounts the kernel's filesystems, loads the modules
//! the initramfs carries (virtio, erofs, overlay, 9p), finds the host's
//! virtio-serial port, builds the command's root from the image disk, runs
//! the one command the host sends, streams its I/O, reports how it ended and
//! ends the VM. A kept VM's agent instead serves the commands the
//! host sends, each under its id, until the host closes the port.
//! Anything that goes wrong is one line on the port (when it is open) and on
//! the console, then the VM ends: the host never waits on a guest that gave up.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use agentkernel_native::{caps, seccomp};

use crate::protocol::{
    read_frame, volume_tag, write_frame, GuestMessage, HostMessage, RootMode, RunRequest, Volume,
    WindowSize, WorkspaceMode, FIRST_COMMAND, HEARTBEAT_INTERVAL, PORT_NAME, WORKSPACE_TAG,
};

/// Where the command's root is assembled before the agent switches into it.
const NEW_ROOT: &str = "/newroot";
const MODULE_LIST: &str = "/lib/modules/load-order";

type Port = Arc<Mutex<File>>;

pub fn main() -> ! {
    // A warm VM's first command (`protocol::FIRST_COMMAND`): the launch
    // path has run by now, which is all it is for.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == FIRST_COMMAND[1])
    {
        std::process::exit(0);
    }
    if let Err(e) = agent() {
        eprintln!("agentkernel-guest: {e}");
    }
    end_vm()
}

fn agent() -> io::Result<()> {
    mount_kernel_filesystems()?;
    let started_ms = uptime_ms();
    load_modules()?;
    let modules_ms = uptime_ms();
    // The OOM killer must pick the command, never the agent.
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
    // Every sandbox has `lo` up (native brings it up under --no-network
    // too). Before the hello: ~20 ms of kernel work under TCG that a warm
    // VM then does before its run is claimed, not after.
    agentkernel_net::loopback_up().map_err(|e| io::Error::other(e.to_string()))?;
    let port = open_port()?;
    let mut reader = port.try_clone()?;
    let port: Port = Arc::new(Mutex::new(port));
    send(
        &port,
        &GuestMessage::Ready {
            started_ms,
            modules_ms,
            uptime_ms: uptime_ms(),
        },
    )?;
    heartbeat(port.clone());
    let (mut request, kept) = match read_frame::<_, HostMessage>(&mut reader)? {
        Some(HostMessage::Run(r)) => (r, false),
        Some(HostMessage::Keep(r)) => (r, true),
        other => return Err(io::Error::other(format!("expected Run, got {other:?}"))),
    };
    let built = network(&request).and_then(|()| {
        sandbox_cgroup(&request).and_then(|cgroup| {
            build_root(&request)
                .and_then(|()| switch_root())
                .and_then(|()| write_secret_files(&request))
                .and_then(|()| inject_files(&request))
                .and_then(|()| seal_root(&request))
                .map(|()| cgroup)
        })
    });
    let cgroup = match built {
        Ok(cgroup) => cgroup,
        Err(e) => {
            let why = format!("cannot build the sandbox's root: {e}");
            let _ = send(&port, &GuestMessage::Failed(why.clone()));
            return Err(io::Error::other(why));
        }
    };
    // In their tmpfs now: no copy stays in the agent (a kept VM's request
    // is the base of every later command's).
    request.secret_files = Vec::new();
    let tunnels = match request
        .egress_port
        .map(|p| egress_tunnels(p, &port))
        .transpose()
    {
        Ok(t) => t,
        Err(e) => {
            let why = format!("cannot listen for the egress proxy: {e}");
            let _ = send(&port, &GuestMessage::Failed(why.clone()));
            return Err(io::Error::other(why));
        }
    };
    if kept {
        warm_up(&request);
        send(&port, &GuestMessage::Kept)?;
        return serve(&request, &port, reader, cgroup, tunnels);
    }
    run_command(&request, &port, reader, cgroup, tunnels)
}

type Tunnels = Arc<crate::tunnel::Tunnels<std::net::TcpStream>>;

/// The egress proxy's port on the guest's loopback (the VM has no other
/// network): each connection to it is carried to the host, which hands
/// it to the proxy. Bound before the command exists, so nothing in the
/// guest can take the port first.
fn egress_tunnels(proxy_port: u16, port: &Port) -> io::Result<Tunnels> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", proxy_port))?;
    let port = port.clone();
    let tunnels =
        crate::tunnel::Tunnels::new(move |frame| send(&port, &GuestMessage::Tunnel(frame)), None);
    let accepting = tunnels.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = stream.set_nodelay(true);
            accepting.open(stream);
        }
    });
    Ok(tunnels)
}

/// Says `Alive` every [`HEARTBEAT_INTERVAL`] until the port fails (the host
/// went away) or the VM ends. Its own thread: nothing the agent
/// waits for (a command, a mount, a slow 9p read) may hold it up.
fn heartbeat(port: Port) {
    std::thread::spawn(move || loop {
        std::thread::sleep(HEARTBEAT_INTERVAL);
        if send(&port, &GuestMessage::Alive).is_err() {
            return;
        }
    });
}

fn send(port: &Port, message: &GuestMessage) -> io::Result<()> {
    let mut port = port.lock().unwrap_or_else(|p| p.into_inner());
    write_frame(&mut *port, message)
}

fn mount_kernel_filesystems() -> io::Result<()> {
    mount(Some("proc"), "/proc", Some("proc"), 0, None)?;
    mount(Some("sysfs"), "/sys", Some("sysfs"), 0, None)?;
    mount(Some("devtmpfs"), "/dev", Some("devtmpfs"), 0, None)
}

/// The modules the host listed, in dependency order (plain `.ko` files).
/// A line may name, after the module, what it is for: virtio devices by id
/// (`0x0001` a NIC, `0x0009` a 9p share) or the bus of a virtio transport
/// (`pci`, `mmio`); such a module is skipped when the VM has none of them.
/// The buses are known from the start; the virtio devices once the
/// transport, listed before, has probed them.
fn load_modules() -> io::Result<()> {
    let list = match std::fs::read_to_string(MODULE_LIST) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    // Each looked up once, when a line first needs it.
    let mut present: Option<VirtioDevices> = None;
    let (mut pci, mut mmio): (Option<bool>, Option<bool>) = (None, None);
    for line in list.lines() {
        let mut words = line.split_whitespace();
        let Some(name) = words.next() else {
            continue;
        };
        let only_with: Vec<&str> = words.collect();
        let wanted = only_with.is_empty()
            || only_with.iter().any(|tag| match *tag {
                "pci" => *pci.get_or_insert_with(|| bus_may_have("/sys/bus/pci/devices", |_| true)),
                // ACPI's id of a virtio-mmio device (a microvm's).
                "mmio" => *mmio.get_or_insert_with(|| {
                    bus_may_have("/sys/bus/platform/devices", |name| {
                        name.starts_with("LNRO0005:")
                    })
                }),
                id => present
                    .get_or_insert_with(VirtioDevices::probed)
                    .has_any(&[id]),
            });
        if !wanted {
            continue;
        }
        let path = format!("/lib/modules/{name}");
        let file = File::open(&path)?;
        // SAFETY: a valid fd and an empty, NUL-terminated parameter string.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                c"".as_ptr(),
                0,
            )
        };
        let err = io::Error::last_os_error();
        if rc != 0 && err.raw_os_error() != Some(libc::EEXIST) {
            return Err(io::Error::other(format!("loading {name}: {err}")));
        }
    }
    Ok(())
}

/// Whether the bus directory `dir` lists a device that `matches` — or
/// cannot be read, which loads the module as if it did.
fn bus_may_have(dir: &str, matches: impl Fn(&str) -> bool) -> bool {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .any(|e| matches(&e.file_name().to_string_lossy())),
        Err(_) => true,
    }
}

/// The VM's virtio devices, by device id.
enum VirtioDevices {
    Known(std::collections::HashSet<String>),
    /// The bus could not be read: every module is loaded, as if every
    /// device were there.
    Unknown,
}

impl VirtioDevices {
    fn probed() -> VirtioDevices {
        let Ok(entries) = std::fs::read_dir("/sys/bus/virtio/devices") else {
            return VirtioDevices::Unknown;
        };
        let mut ids = std::collections::HashSet::new();
        for entry in entries {
            let Ok(id) = entry.and_then(|e| std::fs::read_to_string(e.path().join("device")))
            else {
                return VirtioDevices::Unknown;
            };
            ids.insert(id.trim().to_string());
        }
        VirtioDevices::Known(ids)
    }

    fn has_any(&self, ids: &[&str]) -> bool {
        match self {
            VirtioDevices::Known(present) => ids.iter().any(|id| present.contains(*id)),
            VirtioDevices::Unknown => true,
        }
    }
}

/// If the host gave the VM a NIC, the one with the lease's MAC gets the
/// lease's address and the default route via agentkernel's bridge (`lo` is
/// up already, since before the hello).
fn network(request: &RunRequest) -> io::Result<()> {
    let Some(net) = &request.network else {
        return Ok(());
    };
    // The NIC appears once virtio-net has probed it: give it a moment.
    let mut name = None;
    for _ in 0..500 {
        name = nic_with_mac(&net.mac);
        if name.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let name = name.ok_or_else(|| io::Error::other(format!("no NIC with MAC {}", net.mac)))?;
    agentkernel_net::configure_interface(&name, net.ip, net.prefix, net.gateway)
        .map_err(|e| io::Error::other(format!("network: {e}")))
}

fn nic_with_mac(mac: &str) -> Option<String> {
    std::fs::read_dir("/sys/class/net")
        .ok()?
        .flatten()
        .find(|e| {
            std::fs::read_to_string(e.path().join("address"))
                .is_ok_and(|a| a.trim().eq_ignore_ascii_case(mac))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

/// The virtio-serial port named [`PORT_NAME`] (its device node appears
/// when the driver has probed it; give it a moment).
fn open_port() -> io::Result<File> {
    for _ in 0..500 {
        if let Ok(entries) = std::fs::read_dir("/sys/class/virtio-ports") {
            for entry in entries.flatten() {
                let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
                if name.trim() == PORT_NAME {
                    let dev = Path::new("/dev").join(entry.file_name());
                    if let Ok(f) = File::options().read(true).write(true).open(&dev) {
                        return Ok(f);
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(io::Error::other(format!(
        "no virtio-serial port named {PORT_NAME}"
    )))
}

fn uptime_ms() -> u64 {
    let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    let seconds: f64 = uptime
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    (seconds * 1000.0) as u64
}

/// The image disk (read-only, under a tmpfs overlay), the kernel's
/// filesystems, a private /dev, /tmp and the workspace, all under
/// [`NEW_ROOT`]. A read-only root gets the overlay too: the set-up writes
/// into it (mount points, /etc files, secret files, `[[files]]`) and
/// [`seal_root`] makes it read-only before the command exists, as native
/// does.
fn build_root(request: &RunRequest) -> io::Result<()> {
    for dir in ["/image", "/scratch", NEW_ROOT] {
        std::fs::create_dir_all(dir)?;
    }
    mount(
        Some("/dev/vda"),
        "/image",
        Some("erofs"),
        libc::MS_RDONLY,
        None,
    )?;
    // Writable layers live in RAM: the guest's memory bounds them.
    mount(
        Some("scratch"),
        "/scratch",
        Some("tmpfs"),
        0,
        Some("mode=0755"),
    )?;
    for dir in ["/scratch/root", "/scratch/root-work"] {
        std::fs::create_dir(dir)?;
    }
    mount(
        Some("overlay"),
        NEW_ROOT,
        Some("overlay"),
        0,
        Some("lowerdir=/image,upperdir=/scratch/root,workdir=/scratch/root-work"),
    )?;
    let at = |p: &str| format!("{NEW_ROOT}{p}");
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(Some("proc"), &at("/proc"), Some("proc"), nosuid, None)?;
    mount(
        Some("sysfs"),
        &at("/sys"),
        Some("sysfs"),
        nosuid | libc::MS_RDONLY,
        None,
    )?;
    private_dev(&at("/dev"))?;
    // The command's own cgroup at /sys/fs/cgroup, read-only, as a container
    // shows it: its limits can be read (`cat /sys/fs/cgroup/memory.max`),
    // nothing can be changed or escaped through it.
    if Path::new(SANDBOX_CGROUP).is_dir() {
        let view = at("/sys/fs/cgroup");
        mount(Some(SANDBOX_CGROUP), &view, None, libc::MS_BIND, None)?;
        mount(
            None,
            &view,
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | nosuid,
            None,
        )?;
    }
    let tmp = match request.root {
        RootMode::ReadOnly => format!("mode=1777,size={}", request.tmp_bytes.max(1 << 20)),
        RootMode::Overlay => "mode=1777".to_string(),
    };
    mount(
        Some("tmpfs"),
        &at("/tmp"),
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&tmp),
    )?;
    if let Some(net) = &request.network {
        resolv_conf(&net.resolv_conf)?;
    }
    if let Some(ca) = &request.egress_ca {
        install_egress_ca(ca)?;
    }
    if let Some(workspace) = &request.workspace {
        let target = at(&workspace.path);
        let read_only = workspace.mode != WorkspaceMode::ReadWrite;
        let options = format!(
            "trans=virtio,version=9p2000.L,msize=262144,cache=none{}",
            if read_only { ",ro" } else { "" }
        );
        let flags = if read_only { libc::MS_RDONLY } else { 0 };
        if workspace.mode == WorkspaceMode::CopyOnWrite {
            std::fs::create_dir_all("/share")?;
            mount(
                Some(WORKSPACE_TAG),
                "/share",
                Some("9p"),
                flags,
                Some(&options),
            )?;
            for dir in ["/scratch/ws", "/scratch/ws-work"] {
                std::fs::create_dir(dir)?;
            }
            mount(
                Some("overlay"),
                &target,
                Some("overlay"),
                0,
                Some("lowerdir=/share,upperdir=/scratch/ws,workdir=/scratch/ws-work"),
            )?;
        } else {
            mount(
                Some(WORKSPACE_TAG),
                &target,
                Some("9p"),
                flags,
                Some(&options),
            )?;
        }
    }
    for (n, volume) in request.volumes.iter().enumerate() {
        mount_volume(n, volume, &at(&volume.path))?;
    }
    Ok(())
}

/// The egress proxy's CA in the root's bundles and /etc/agentkernel, as
/// native adds it (its code, resolved inside the root), in the root's
/// tmpfs overlay (before a read-only root is sealed).
fn install_egress_ca(ca: &str) -> io::Result<()> {
    let dir: OwnedFd = File::open(NEW_ROOT)?.into();
    agentkernel_native::egress::install_ca(&dir, ca)
        .map_err(|e| io::Error::other(format!("install the egress proxy's CA: {e}")))
}

/// Volume `n`'s share at `target` (made if missing, in the root's overlay).
fn mount_volume(n: usize, volume: &Volume, target: &str) -> io::Result<()> {
    std::fs::create_dir_all(target).map_err(|e| {
        io::Error::other(format!(
            "volume {}: cannot make its mount point ({e}); mount it at another path",
            volume.path
        ))
    })?;
    let options = format!(
        "trans=virtio,version=9p2000.L,msize=262144,cache=none{}",
        if volume.read_only { ",ro" } else { "" }
    );
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if volume.read_only {
        flags |= libc::MS_RDONLY;
    }
    mount(
        Some(&volume_tag(n)),
        target,
        Some("9p"),
        flags,
        Some(&options),
    )
    .map_err(|e| io::Error::other(format!("volume {}: {e}", volume.path)))
}

/// The command's `/etc/resolv.conf`, as native writes it: into the root's
/// overlay, an image's symlink replaced, not followed.
fn resolv_conf(text: &str) -> io::Result<()> {
    let etc = format!("{NEW_ROOT}/etc");
    let target = format!("{etc}/resolv.conf");
    std::fs::create_dir_all(&etc)?;
    match std::fs::remove_file(&target) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::write(&target, text)
}

/// A tmpfs /dev with the usual nodes: the guest's devtmpfs (with the host's
/// port in it) stays out of the command's sight.
fn private_dev(dev: &str) -> io::Result<()> {
    mount(
        Some("tmpfs"),
        dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=0755"),
    )?;
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let path = cstring(&format!("{dev}/{name}"))?;
        // SAFETY: a valid path; mknod only creates the node.
        let rc = unsafe {
            libc::mknod(
                path.as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(major, minor),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    for dir in ["pts", "shm"] {
        std::fs::create_dir(format!("{dev}/{dir}"))?;
    }
    mount(
        Some("devpts"),
        &format!("{dev}/pts"),
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mount(
        Some("shm"),
        &format!("{dev}/shm"),
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    )?;
    for (link, target) in agentkernel_native::rootfs::DEV_SYMLINKS {
        std::os::unix::fs::symlink(target, format!("{dev}/{link}"))?;
    }
    Ok(())
}

/// The command's cgroup in the guest's hierarchy.
const SANDBOX_CGROUP: &str = "/cgroup/sandbox";
/// The period of the command's `cpu.max`, as Docker and native use it.
const CPU_PERIOD_US: u64 = 100_000;

/// A cgroup for the command with the profile's pids, memory and CPU limits,
/// on a cgroup2 mount in the initramfs: once the agent has switched roots
/// the command reaches it only as the read-only view of its own cgroup at
/// /sys/fs/cgroup (`build_root`), and through the returned `cgroup.procs`,
/// which the command's process writes itself into before exec.
fn sandbox_cgroup(request: &RunRequest) -> io::Result<Option<File>> {
    if request.pids_max.is_none() && request.memory_max.is_none() && request.cpu_max.is_none() {
        return Ok(None);
    }
    std::fs::create_dir_all("/cgroup")?;
    mount(Some("cgroup2"), "/cgroup", Some("cgroup2"), 0, None)?;
    std::fs::write("/cgroup/cgroup.subtree_control", "+pids +memory +cpu")?;
    std::fs::create_dir(SANDBOX_CGROUP)?;
    if let Some(max) = request.pids_max {
        std::fs::write("/cgroup/sandbox/pids.max", max.to_string())?;
    }
    if let Some(cpus) = request.cpu_max {
        let quota = (cpus * CPU_PERIOD_US as f64).round() as u64;
        std::fs::write(
            "/cgroup/sandbox/cpu.max",
            format!("{} {CPU_PERIOD_US}", quota.max(1000)),
        )?;
    }
    if let Some(max) = request.memory_max {
        std::fs::write("/cgroup/sandbox/memory.max", max.to_string())?;
        // No swap in the guest, but say so: the limit is the whole budget.
        let _ = std::fs::write("/cgroup/sandbox/memory.swap.max", "0");
    }
    File::options()
        .write(true)
        .open("/cgroup/sandbox/cgroup.procs")
        .map(Some)
}

/// The initramfs cannot be pivoted away from: move the new root over `/`
/// and chroot into it, as switch_root does. The agent's open port survives.
fn switch_root() -> io::Result<()> {
    std::env::set_current_dir(NEW_ROOT)?;
    mount(Some("."), "/", None, libc::MS_MOVE, None)?;
    let dot = cstring(".")?;
    // SAFETY: a valid path.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std::env::set_current_dir("/")
}

/// `--secret-file`s, on their tmpfs in the sandbox's root (native's code:
/// the image's own users, the same modes).
fn write_secret_files(request: &RunRequest) -> io::Result<()> {
    if request.secret_files.is_empty() {
        return Ok(());
    }
    agentkernel_native::rootfs::write_secret_files(&request.secret_files, request.user.as_deref())
        .map_err(|e| io::Error::other(format!("--secret-file: {e}")))
}

/// A read-only root becomes read-only once the set-up has written into
/// it: the overlay's mount (now "/") is remounted read-only, so nothing the
/// command runs can write to it, the image's disk below it being
/// read-only as well.
fn seal_root(request: &RunRequest) -> io::Result<()> {
    if request.root != RootMode::ReadOnly {
        return Ok(());
    }
    mount(
        None,
        "/",
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
        None,
    )
}

/// `[[files]]`, once in the sandbox's root: each path is resolved inside
/// it (the native backend's code), so an image's symlink leads to the
/// sandbox's own files.
fn inject_files(request: &RunRequest) -> io::Result<()> {
    if request.files.is_empty() {
        return Ok(());
    }
    let root = agentkernel_native::copy::SandboxRoot::current()?;
    agentkernel_native::copy::inject(&root, &request.files)
}

/// Under TCG the guest's code is translated the first time it runs: in a
/// fresh VM, the first command paid for the translation of the kernel's
/// fork, seccomp and exec paths and of the image's own shell, loader and C
/// library (a kept VM's first `true` took ~120 ms, the next ones ~45 ms).
/// So before a kept or warm VM is declared ready, the image's shell runs
/// once, `sh -c :`, through the same set-up as a command (its own session,
/// no_new_privs, the seccomp filter) and confined so that the command can
/// see nothing of it: see [`confined_shell`]. It runs the image's code the
/// command is about to run anyway, in the VM only that command will use.
/// An image without `/bin/sh` costs only the speed-up.
fn warm_up(request: &RunRequest) {
    let restrictive = request.seccomp_restrictive;
    let mut pid_pipe = [0; 2];
    // SAFETY: pipe2 writes two fds into our array.
    if unsafe { libc::pipe2(pid_pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return;
    }
    let [read_end, write_end] = pid_pipe;
    // The child runs plain syscalls, and builds the seccomp filter after
    // the C library's fork made its allocator usable.
    let forked = reaper::fork(|| {
        // SAFETY: the child's copy of the read end, unused there.
        unsafe { libc::close(read_end) };
        shell_namespace(write_end, restrictive)
    });
    // SAFETY: our copy of the pipe's write end; the child has its own.
    unsafe { libc::close(write_end) };
    let Ok(holder) = forked else {
        // SAFETY: ours.
        unsafe { libc::close(read_end) };
        return;
    };
    let mut shell: libc::pid_t = 0;
    // SAFETY: reads at most the pid's bytes into it; end of file (the
    // holder failed before forking) leaves 0.
    unsafe {
        libc::read(
            read_end,
            (&mut shell as *mut libc::pid_t).cast(),
            std::mem::size_of::<libc::pid_t>(),
        );
        libc::close(read_end);
    }
    if reaper::wait(holder, Some(Duration::from_secs(5))).is_none() {
        // The shell is its namespace's init: all it started dies with it.
        // SAFETY: kill takes pids; the shell is unreaped until the holder
        // (killed next, after it) reaps it.
        unsafe {
            if shell > 0 {
                libc::kill(shell, libc::SIGKILL);
            }
            libc::kill(holder, libc::SIGKILL);
        }
        reaper::wait(holder, None);
    }
    prefetch(&["/bin/sh"]);
}

/// The warm-up shell's parent: in new mount, pid, network, IPC and UTS
/// namespaces (so the shell is its pid namespace's init, and all it could
/// start dies with it), it forks the shell, tells the agent the shell's pid
/// and waits for it. Returns the exit code for `_exit`.
fn shell_namespace(pid_out: libc::c_int, restrictive: bool) -> libc::c_int {
    let namespaces = libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS;
    // SAFETY: plain syscalls on our own process.
    unsafe {
        if libc::setsid() < 0 || libc::unshare(namespaces) != 0 {
            return 1;
        }
        let shell = libc::fork();
        if shell == 0 {
            libc::close(pid_out);
            confined_shell(restrictive);
            libc::_exit(127);
        }
        if shell < 0 {
            return 1;
        }
        libc::write(
            pid_out,
            (&shell as *const libc::pid_t).cast(),
            std::mem::size_of::<libc::pid_t>(),
        );
        let mut status = 0;
        libc::waitpid(shell, &mut status, 0);
    }
    0
}

/// Execs the image's `/bin/sh -c :` (returns only if something failed):
/// - its stdio on /dev/null and no other descriptor open;
/// - in a private mount namespace, chrooted into a read-only bind of the
///   root's own filesystem alone (not /proc, /dev, /tmp, the workspace or
///   the volumes mounted on it), so it can write nothing anywhere;
/// - as nobody (65534), with no_new_privs (no setuid binary of the image
///   gains anything) and the command's seccomp filter;
/// - with no network but its own namespace's down loopback.
fn confined_shell(restrictive: bool) {
    let argv = [
        c"sh".as_ptr(),
        c"-c".as_ptr(),
        c":".as_ptr(),
        std::ptr::null(),
    ];
    let envp = [
        c"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".as_ptr(),
        std::ptr::null(),
    ];
    let nobody: libc::uid_t = 65534;
    let view = c"/tmp";
    // SAFETY: plain syscalls with valid C strings and arrays; this process
    // is single-threaded (just forked).
    unsafe {
        let null = std::ptr::null::<libc::c_char>();
        let private = libc::MS_REC | libc::MS_PRIVATE;
        let read_only =
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
        // Its stdio is /dev/null, and no other descriptor of the agent's
        // (the port, a tunnel) is left open to it.
        let devnull = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        let quiet = devnull >= 0
            && (0..3).all(|fd| libc::dup2(devnull, fd) == fd)
            && libc::syscall(libc::SYS_close_range, 3, libc::c_uint::MAX, 0) == 0;
        let confined = quiet
            && libc::mount(null, c"/".as_ptr(), null, private, std::ptr::null()) == 0
            && libc::mount(
                c"/".as_ptr(),
                view.as_ptr(),
                null,
                libc::MS_BIND,
                std::ptr::null(),
            ) == 0
            && libc::mount(null, view.as_ptr(), null, read_only, std::ptr::null()) == 0
            && libc::chroot(view.as_ptr()) == 0
            && libc::chdir(c"/".as_ptr()) == 0
            && libc::setgroups(0, std::ptr::null()) == 0
            && libc::setresgid(nobody, nobody, nobody) == 0
            && libc::setresuid(nobody, nobody, nobody) == 0
            && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0;
        if !confined || seccomp::install(restrictive).is_err() {
            return;
        }
        libc::execve(c"/bin/sh".as_ptr(), argv.as_ptr(), envp.as_ptr());
    }
}

/// Most commands start with the image's shell or at least its ELF loader,
/// and a fresh VM reads them from the image disk: the first read of the
/// block device, EROFS and the overlay, in emulated code. Reading (never
/// running) those files and their loader before the VM is ready moves
/// that into the boot. Page cache only: the image's root is read-only
/// below the overlay, so nothing the command can see changes.
fn prefetch(paths: &[&str]) {
    /// Enough for a shell and a loader; a bigger file is not read whole.
    const MAX_BYTES: u64 = 8 << 20;
    let read = |path: &str| -> Option<Vec<u8>> {
        let file = File::open(path).ok()?;
        if file.metadata().ok()?.len() > MAX_BYTES {
            return None;
        }
        let mut bytes = Vec::new();
        file.take(MAX_BYTES).read_to_end(&mut bytes).ok()?;
        Some(bytes)
    };
    for path in paths {
        if let Some(bytes) = read(path) {
            if let Some(loader) = elf_interpreter(&bytes) {
                let _ = read(&loader);
            }
        }
    }
}

/// The loader a 64-bit little-endian ELF names (its PT_INTERP), if any.
fn elf_interpreter(elf: &[u8]) -> Option<String> {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?));
    // ELFCLASS64, ELFDATA2LSB.
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let table = usize::try_from(u64_at(0x20)?).ok()?;
    let entry_size = usize::from(u16_at(0x36)?);
    for n in 0..usize::from(u16_at(0x38)?) {
        let header = table.checked_add(n.checked_mul(entry_size)?)?;
        if u32_at(header)? != PT_INTERP {
            continue;
        }
        let offset = usize::try_from(u64_at(header + 8)?).ok()?;
        let size = usize::try_from(u64_at(header + 32)?).ok()?;
        let name = elf.get(offset..offset.checked_add(size)?)?;
        let name = name.split(|b| *b == 0).next()?;
        return String::from_utf8(name.to_vec()).ok();
    }
    None
}

/// Where a command's messages go: the port, wrapped in `From { id }` for a
/// kept VM's commands.
#[derive(Clone)]
struct Out {
    port: Port,
    id: Option<u64>,
}

impl Out {
    fn send(&self, message: GuestMessage) -> io::Result<()> {
        match self.id {
            Some(id) => send(
                &self.port,
                &GuestMessage::From {
                    id,
                    message: Box::new(message),
                },
            ),
            None => send(&self.port, &message),
        }
    }
}

/// What the host sends a running command's input side.
enum Input {
    Data(Vec<u8>),
    /// The host's stdin ended: a pipe closes (the command sees EOF); a
    /// terminal stays (as a terminal does when nobody types).
    Close,
    /// The host's terminal changed size (ignored without a terminal).
    Resize(WindowSize),
}

/// A started command: the leader of its own session, the channel to its
/// input and the threads pumping its output.
struct Launched {
    pid: libc::pid_t,
    stdin: mpsc::Sender<Input>,
    pumps: Vec<std::thread::JoinHandle<()>>,
    oom_kills_before: u64,
}

/// Why a command did not start; the host has been told already.
enum NotStarted {
    /// The agent could not run it (`Failed` sent): a one-shot VM gives up.
    Failed(String),
    /// The command's own failure (127/126, as a shell says it), reported as its exit.
    Reported,
}

/// The one-shot VM's command: started, fed the host's stdin and signals,
/// waited for; then every other process in the guest is killed.
fn run_command(
    request: &RunRequest,
    port: &Port,
    mut reader: File,
    cgroup: Option<File>,
    tunnels: Option<Tunnels>,
) -> io::Result<()> {
    let out = Out {
        port: port.clone(),
        id: None,
    };
    let cgroup_fd = cgroup.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    let launched = match launch(request, &out, cgroup_fd)? {
        Ok(launched) => launched,
        Err(NotStarted::Failed(why)) => return Err(io::Error::other(why)),
        Err(NotStarted::Reported) => return Ok(()),
    };
    let (pid, stdin) = (launched.pid, launched.stdin.clone());
    let (port_closed, host_gone) = mpsc::channel::<()>();
    // Stdin and signals: the host's frames until it stops sending.
    std::thread::spawn(move || {
        while let Ok(Some(message)) = read_frame::<_, HostMessage>(&mut reader) {
            match message {
                HostMessage::Tunnel(frame) => {
                    if let Some(tunnels) = &tunnels {
                        tunnels.handle(frame);
                    }
                }
                message => deliver(message, pid, &stdin),
            }
        }
        drop(port_closed);
    });
    finish(launched, request.timeout_ms, &out, true)?;
    // The host ends the VM once it has read `Exited`. Ending it here
    // instead could lose the end of the output: what QEMU has not yet
    // passed on to a slow reader is still in the port's queue, and a reset
    // drops it. So the agent waits until the host kills the VM, or until
    // the port closes because the host is gone (QEMU dies with the host
    // anyway, PR_SET_PDEATHSIG).
    let _ = host_gone.recv();
    Ok(())
}

/// A host message for a running command: stdin, its end, or a signal.
fn deliver(message: HostMessage, pid: libc::pid_t, stdin: &mpsc::Sender<Input>) {
    match message {
        HostMessage::Stdin(data) => {
            let _ = stdin.send(Input::Data(data));
        }
        HostMessage::StdinClosed => {
            let _ = stdin.send(Input::Close);
        }
        HostMessage::Resize(size) => {
            let _ = stdin.send(Input::Resize(size));
        }
        // SAFETY: kill has no memory preconditions; the command leads its
        // own session, so its group is -pid.
        HostMessage::Signal(signo) => unsafe {
            libc::kill(-pid, signo);
        },
        _ => {}
    }
}

/// A kept VM: the root is built; runs each command the host sends under its
/// id, concurrently, until the host closes the port.
fn serve(
    base: &RunRequest,
    port: &Port,
    mut reader: File,
    cgroup: Option<File>,
    tunnels: Option<Tunnels>,
) -> io::Result<()> {
    type Running = HashMap<u64, (libc::pid_t, mpsc::Sender<Input>)>;
    let running: Arc<Mutex<Running>> = Arc::default();
    // Kept open as long as the agent lives: every command joins it.
    let cgroup_fd = cgroup.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    while let Some(message) = read_frame::<_, HostMessage>(&mut reader)? {
        match message {
            HostMessage::For { id, message } => match *message {
                HostMessage::Run(command) => {
                    let out = Out {
                        port: port.clone(),
                        id: Some(id),
                    };
                    let command = within_sandbox(base, command);
                    let launched = match launch(&command, &out, cgroup_fd)? {
                        Ok(launched) => launched,
                        Err(_) => continue,
                    };
                    lock(&running).insert(id, (launched.pid, launched.stdin.clone()));
                    let running = running.clone();
                    std::thread::spawn(move || {
                        let _ = finish(launched, command.timeout_ms, &out, false);
                        lock(&running).remove(&id);
                    });
                }
                other => {
                    let target = lock(&running).get(&id).cloned();
                    if let Some((pid, stdin)) = target {
                        deliver(other, pid, &stdin);
                    }
                }
            },
            HostMessage::EndAll => {
                let count = processes_but_the_agent();
                // SAFETY: kill(-1) signals every process but ourselves.
                unsafe { libc::kill(-1, libc::SIGKILL) };
                send(port, &GuestMessage::EndedAll(count))?;
            }
            HostMessage::Tunnel(frame) => {
                if let Some(tunnels) = &tunnels {
                    tunnels.handle(frame);
                }
            }
            _ => {}
        }
    }
    // The host closed the port: the sandbox ends.
    Ok(())
}

/// A kept VM's command takes its argv, environment, working directory,
/// user, timeout and terminal from the host; what confines it stays the sandbox's.
fn within_sandbox(base: &RunRequest, command: RunRequest) -> RunRequest {
    RunRequest {
        argv: command.argv,
        env: command.env,
        workdir: command.workdir,
        user: command.user,
        timeout_ms: command.timeout_ms,
        tty: command.tty,
        ..base.clone()
    }
}

/// User processes in the guest other than the agent (kernel threads are
/// kthreadd's, pid 2, and its children).
fn processes_but_the_agent() -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid > 2)
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The ppid is the second field after the parenthesised name.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            ppid.is_some_and(|p| p != 2)
        })
        .count() as u64
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts `request`'s command as the profile says (user, capabilities,
/// seccomp, its cgroup), its output pumped to `out`.
fn launch(
    request: &RunRequest,
    out: &Out,
    cgroup_fd: Option<std::os::fd::RawFd>,
) -> io::Result<Result<Launched, NotStarted>> {
    let failed = |why: String| -> io::Result<Result<Launched, NotStarted>> {
        out.send(GuestMessage::Failed(why.clone()))?;
        Ok(Err(NotStarted::Failed(why)))
    };
    let (uid, gid) = match resolve_user(request.user.as_deref()) {
        Ok(ids) => ids,
        Err(why) => return failed(why),
    };
    let Some((program, args)) = request.argv.split_first() else {
        return failed("no command".into());
    };
    // Checked first, so that a failed spawn below is about the program.
    if !Path::new(&request.workdir).is_dir() {
        return failed(format!(
            "the working directory {} does not exist in the image; choose another with --workdir",
            request.workdir
        ));
    }
    let terminal = match request
        .tty
        .map(|size| allocate_terminal(size, uid, gid))
        .transpose()
    {
        Ok(t) => t,
        Err(e) => return failed(format!("cannot allocate a terminal: {e}")),
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(request.env.iter().filter_map(|kv| kv.split_once('=')))
        .current_dir(&request.workdir);
    let with_terminal = terminal.is_some();
    match &terminal {
        // The slave is all three: a terminal merges stderr into stdout.
        Some((_, slave)) => {
            command
                .stdin(slave.try_clone()?)
                .stdout(slave.try_clone()?)
                .stderr(slave.try_clone()?);
        }
        None => {
            command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
    }
    let no_new_privileges = request.no_new_privileges;
    let seccomp_restrictive = request.seccomp_restrictive;
    let keep: Vec<u32> = request
        .capabilities
        .iter()
        .filter_map(|c| caps::number(c))
        .collect();
    // SAFETY: the child may allocate (the seccomp program, /proc reads)
    // although the agent has other threads: the C library's fork leaves
    // its allocator usable in the child. The rest is plain syscalls.
    unsafe {
        command.pre_exec(move || {
            // The agent's OOM immunity is inherited: give it back, or the
            // OOM killer finds no one to kill and the kernel panics.
            let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            libc::close(fd);
            if let Some(procs) = cgroup_fd {
                // "0": the writing process itself.
                if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // The new session's controlling terminal: job control, ^C as
            // SIGINT and /dev/tty work as on a login's terminal.
            if with_terminal && libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // As the native backend does it (command.rs): no_new_privs, its
            // seccomp filter while we may still install it, the bounding
            // set, the user, then the kept capabilities for root.
            if no_new_privileges && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            seccomp::install(seccomp_restrictive)?;
            caps::limit_bounding_set(&keep)?;
            // The user last (Command's own uid/gid would come before this
            // closure, and /proc/self is root's after a uid change).
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
            if uid == 0 {
                caps::set(&keep)?;
            }
            Ok(())
        });
    }
    let oom_kills_before = oom_kills();
    let spawned = reaper::spawn(&mut command);
    // Our copies of the slave closed: once the command and what it leaves
    // have closed theirs, the master reads EIO and its pump ends.
    drop(command);
    let (master, slave) = terminal.unzip();
    drop(slave);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            // The command's failure, not ours: 127 and 126 as a shell (and
            // every other backend) says them.
            let (code, what) = match e.kind() {
                io::ErrorKind::NotFound => (127, "command not found"),
                io::ErrorKind::PermissionDenied => (126, "permission denied"),
                _ if e.raw_os_error() == Some(libc::ENOEXEC) => (126, "cannot execute"),
                _ => return failed(format!("cannot run {program}: {e}")),
            };
            let line = format!("agentkernel: {program}: {what}\n");
            // On a terminal, as the terminal would have shown it.
            out.send(match master {
                Some(_) => GuestMessage::Stdout(line.replace('\n', "\r\n").into_bytes()),
                None => GuestMessage::Stderr(line.into_bytes()),
            })?;
            out.send(GuestMessage::Exited {
                code: Some(code),
                signal: None,
                timed_out: false,
                out_of_memory: false,
            })?;
            return Ok(Err(NotStarted::Reported));
        }
    };
    out.send(GuestMessage::Started)?;
    let pid = child.id() as libc::pid_t;
    // With a terminal its master carries both ways (and takes resizes).
    let (pumps, mut writer, master): (Vec<_>, Option<File>, Option<File>) = match master {
        Some(master) => {
            let master = File::from(master);
            let reader = master.try_clone()?;
            (
                vec![pump(reader, out.clone(), GuestMessage::Stdout)],
                Some(master.try_clone()?),
                Some(master),
            )
        }
        None => (
            [
                child
                    .stdout
                    .take()
                    .map(|s| pump(s, out.clone(), GuestMessage::Stdout)),
                child
                    .stderr
                    .take()
                    .map(|s| pump(s, out.clone(), GuestMessage::Stderr)),
            ]
            .into_iter()
            .flatten()
            .collect(),
            child.stdin.take().map(|p| File::from(OwnedFd::from(p))),
            None,
        ),
    };
    // Stdin through a thread of its own: a command that does not read it
    // must not stall the port's reader (or, in a kept VM, other commands).
    let (stdin, frames) = mpsc::channel::<Input>();
    std::thread::spawn(move || {
        while let Ok(input) = frames.recv() {
            match input {
                Input::Data(data) => {
                    if writer.as_mut().is_some_and(|w| w.write_all(&data).is_err()) {
                        writer = None;
                    }
                }
                Input::Close => writer = None,
                Input::Resize(size) => {
                    if let Some(m) = &master {
                        set_window_size(m.as_raw_fd(), size);
                    }
                }
            }
        }
    });
    Ok(Ok(Launched {
        pid,
        stdin,
        pumps,
        oom_kills_before,
    }))
}

/// Waits for the command until its timeout, ends what it left (every
/// process in the guest for a one-shot VM; its process group in a kept
/// one), and reports how it ended.
fn finish(launched: Launched, timeout_ms: Option<u64>, out: &Out, end_all: bool) -> io::Result<()> {
    let pid = launched.pid;
    let status = reaper::wait(pid, timeout_ms.map(Duration::from_millis));
    let leftovers = if end_all { -1 } else { -pid };
    // SAFETY: kill has no memory preconditions. At a timeout the command
    // itself first (it may have left its group), then what it leaves.
    unsafe {
        if status.is_none() {
            libc::kill(pid, libc::SIGKILL);
        }
        // kill(-1) spares PID 1; either way this closes every copy of the
        // command's output pipes.
        libc::kill(leftovers, libc::SIGKILL);
    }
    if status.is_none() {
        reaper::wait(pid, None);
    }
    drop(launched.stdin);
    for pump in launched.pumps {
        let _ = pump.join();
    }
    let message = match status {
        None => GuestMessage::Exited {
            code: None,
            signal: Some(libc::SIGKILL),
            timed_out: true,
            out_of_memory: false,
        },
        Some(status) => {
            let signal = libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status));
            GuestMessage::Exited {
                code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
                signal,
                timed_out: false,
                out_of_memory: signal == Some(libc::SIGKILL)
                    && oom_kills() > launched.oom_kills_before,
            }
        }
    };
    out.send(message)
}

/// A terminal for a command running as `uid`:`gid`, in the command's
/// devpts (the agent is in its root by now, so `tty` names it there):
/// its master, and its slave, owned by the command's user as a login's
/// terminal is.
fn allocate_terminal(size: WindowSize, uid: u32, gid: u32) -> io::Result<(OwnedFd, OwnedFd)> {
    let (master, slave) = agentkernel_native::process::open_terminal()?;
    std::os::unix::fs::fchown(&slave, Some(uid), Some(gid))?;
    set_window_size(master.as_raw_fd(), size);
    Ok((master, slave))
}

fn set_window_size(master: std::os::fd::RawFd, size: WindowSize) {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads the winsize we pass.
    unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &ws) };
}

fn pump(
    mut source: impl Read + Send + 'static,
    out: Out,
    frame: fn(Vec<u8>) -> GuestMessage,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match source.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if out.send(frame(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    })
}

/// PID 1 reaps every process whose parent died. Commands' exits go to
/// whoever waits for them; orphans' are discarded.
mod reaper {
    use std::io;
    use std::process::{Child, Command};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Condvar, Mutex, Once};
    use std::time::{Duration, Instant};

    /// Commands being waited for, and their wait status once reaped.
    static WAITING: Mutex<Vec<(libc::pid_t, Option<libc::c_int>)>> = Mutex::new(Vec::new());
    static REAPED: Condvar = Condvar::new();
    static STARTED: Once = Once::new();
    /// Children forked so far, counted under `WAITING`'s lock: the reaper,
    /// finding no child at all, sleeps until this moves (never polls: a
    /// poll interval was added to the exit of a VM's first command).
    static SPAWNS: AtomicU64 = AtomicU64::new(0);
    static SPAWNED: Condvar = Condvar::new();

    /// Called under `WAITING`'s lock once a child exists.
    fn count_spawn() {
        SPAWNS.fetch_add(1, Ordering::SeqCst);
        SPAWNED.notify_all();
    }

    /// Spawns `command` registered for [`wait`]: under the lock the reaper
    /// takes before reaping, so its exit cannot be reaped unregistered.
    pub(super) fn spawn(command: &mut Command) -> io::Result<Child> {
        STARTED.call_once(|| {
            std::thread::spawn(reap_forever);
        });
        let mut waiting = super::lock(&WAITING);
        let child = command.spawn()?;
        waiting.push((child.id() as libc::pid_t, None));
        count_spawn();
        Ok(child)
    }

    /// Forks a child that runs `child` and `_exit`s with what it returns,
    /// registered for [`wait`] as [`spawn`]'s are.
    pub(super) fn fork(child: impl FnOnce() -> libc::c_int) -> io::Result<libc::pid_t> {
        STARTED.call_once(|| {
            std::thread::spawn(reap_forever);
        });
        let mut waiting = super::lock(&WAITING);
        // SAFETY: the C library's fork leaves its allocator usable in the
        // child, which runs `child` only and never returns here.
        match unsafe { libc::fork() } {
            // SAFETY: ends the child without running the agent's exit path.
            0 => unsafe { libc::_exit(child()) },
            -1 => Err(io::Error::last_os_error()),
            pid => {
                waiting.push((pid, None));
                count_spawn();
                Ok(pid)
            }
        }
    }

    fn reap_forever() {
        loop {
            // Look first, reap under the lock: a child whose exec failed is
            // reaped by `Command::spawn` itself (which would panic had we
            // taken it), and spawn holds the lock until then.
            // SAFETY: siginfo_t is plain data; all zeroes is a valid value.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let spawns_seen = SPAWNS.load(Ordering::SeqCst);
            // SAFETY: waitid writes into our siginfo.
            let looked =
                unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if looked != 0 {
                if io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
                    // No child at all: none appears but by a spawn, which
                    // counts itself under this lock after its fork.
                    let mut waiting = super::lock(&WAITING);
                    while SPAWNS.load(Ordering::SeqCst) == spawns_seen {
                        waiting = SPAWNED.wait(waiting).unwrap_or_else(|p| p.into_inner());
                    }
                }
                continue;
            }
            // SAFETY: waitid filled a child's exit in.
            let pid = unsafe { info.si_pid() };
            let mut waiting = super::lock(&WAITING);
            let mut status = 0;
            // SAFETY: waitpid writes into our status.
            if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } != pid {
                continue;
            }
            if let Some(entry) = waiting.iter_mut().find(|(p, _)| *p == pid) {
                entry.1 = Some(status);
                REAPED.notify_all();
            }
        }
    }

    /// `pid`'s wait status, or `None` when `timeout` came first.
    pub(super) fn wait(pid: libc::pid_t, timeout: Option<Duration>) -> Option<libc::c_int> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut waiting = super::lock(&WAITING);
        loop {
            if let Some(i) = waiting.iter().position(|(p, s)| *p == pid && s.is_some()) {
                return waiting.remove(i).1;
            }
            waiting = match deadline {
                None => REAPED.wait(waiting).unwrap_or_else(|p| p.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    REAPED
                        .wait_timeout(waiting, left)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0)
                }
            };
        }
    }
}

/// The guest kernel's count of OOM kills so far.
fn oom_kills() -> u64 {
    agentkernel_core::cgroup::host_oom_kills().unwrap_or(0)
}

/// `user[:group]` from the image's /etc/passwd and /etc/group (we are in the
/// new root by now), or numeric ids.
fn resolve_user(spec: Option<&str>) -> Result<(u32, u32), String> {
    let Some(spec) = spec.filter(|s| !s.is_empty()) else {
        return Ok((0, 0));
    };
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let lookup = |file: &str, name: &str| -> Option<(u32, u32)> {
        let text = std::fs::read_to_string(file).ok()?;
        text.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&name) && fields.len() > 3).then(|| {
                (
                    fields[2].parse().unwrap_or(u32::MAX),
                    fields[3].parse().unwrap_or(u32::MAX),
                )
            })
        })
    };
    let (uid, primary_gid) = match user.parse::<u32>() {
        Ok(uid) => (uid, lookup_by_uid(uid).unwrap_or(uid)),
        Err(_) => lookup("/etc/passwd", user)
            .ok_or_else(|| format!("user {user} is not in the image's /etc/passwd"))?,
    };
    let gid = match group {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup("/etc/group", g)
                .map(|(gid, _)| gid)
                .ok_or_else(|| format!("group {g} is not in the image's /etc/group"))?,
        },
    };
    Ok((uid, gid))
}

fn lookup_by_uid(uid: u32) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() > 3 && fields[2].parse() == Ok(uid))
            .then(|| fields[3].parse().ok())
            .flatten()
    })
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(io::Error::other)
}

fn mount(
    source: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(cstring).transpose()?;
    let target_c = cstring(target)?;
    let fstype = fstype.map(cstring).transpose()?;
    let data = data.map(cstring).transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: valid C strings or nulls, as mount(2) accepts.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("mount {target}: {e}")));
    }
    Ok(())
}

/// Flushes nothing (every filesystem that matters is in RAM or read-only)
/// and ends the VM; the host sees QEMU exit. A reboot, not a power-off:
/// the guest boots without ACPI (`acpi=off`, see the VMM's kernel command
/// line), which is what powering off needs, and QEMU runs with
/// `-no-reboot`, so the reset through the keyboard controller ends it.
fn end_vm() -> ! {
    // SAFETY: reboot(2) with AUTOBOOT; we are PID 1.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::elf_interpreter;

    #[test]
    fn the_loader_of_a_dynamic_elf_is_found_and_nothing_else_is_taken_for_one() {
        // This test's own binary is dynamically linked: its loader exists.
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let loader = elf_interpreter(&exe).expect("a PT_INTERP");
        assert!(std::path::Path::new(&loader).is_file(), "{loader}");
        assert_eq!(elf_interpreter(b"#!/bin/sh\necho hi\n"), None);
        // Cut anywhere, the headers point past the end: no panic, no name.
        for cut in [0, 5, 0x30, 0x40, 200] {
            assert_eq!(elf_interpreter(&exe[..cut]), None, "cut at {cut}");
        }
    }
}
