//! `agentkernel run -B qemu`: each sandbox is a QEMU VM with its own kernel.
//! This module turns the spec into a VM (the image as a disk, the guest
//! agent's initramfs, the workspace share) and a request for the agent;
//! `agentkernel-vm` does the rest. What VMs cannot do yet is refused here,
//! one line each, before anything is built.

use std::path::Path;

use agentkernel_core::backend::{
    Backend, BackendKind, Capabilities, Collected, Probe, RunOptions, Support,
};
use agentkernel_core::config::{Config, QemuKernel};
use agentkernel_core::egress::EgressSpec;
use agentkernel_core::policy::WorkspaceMode;
use agentkernel_core::secrets::SecretFile;
use agentkernel_core::spec::{ExecRequest, Outcome, SandboxSpec};
use agentkernel_core::state::{SandboxRecord, Store};
use agentkernel_core::{Error, Result};
use agentkernel_image as images;
use agentkernel_vm::protocol::{self, RootMode, RunRequest};
use agentkernel_vm::session::{self, Ended};
use agentkernel_vm::vmm::{self, Qemu, VmConfig};
use agentkernel_vm::{disk, initramfs, kept, kernel};

/// The guest's RAM when no limit applies (permissive profile).
const DEFAULT_MEMORY: u64 = 2 << 30;
/// Guest RAM beyond `--memory` for the guest's own kernel, initramfs and
/// agent: the command's limit is a memory cgroup in the guest, so a memory
/// bomb meets that limit (exit 137) instead of starving the guest's boot.
const GUEST_OVERHEAD: u64 = 192 << 20;
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The qemu backend behind the `Backend` trait: one-shot runs, and kept
/// sandboxes whose VM lives under a holder process (`qemu_kept.rs`).
pub struct QemuBackend {
    store: Store,
}

impl QemuBackend {
    pub fn new(store: Store) -> QemuBackend {
        QemuBackend { store }
    }
}

#[async_trait::async_trait(?Send)]
impl Backend for QemuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn capabilities(&self) -> Capabilities {
        // What a VM cannot do yet is refused by `refuse_unsupported`, with
        // its own hints. The egress proxy needs no root here: the VM's
        // connections to it travel over the agent's port (`run`).
        Capabilities {
            warm_pool: true,
            // Published ports are relayed over IPv4 only, as on native.
            ipv6_ports: Support::no(
                "on the qemu backend",
                "use an IPv4 address such as 127.0.0.1 or 0.0.0.0",
            ),
            ..capabilities_for_this_user()
        }
    }

    async fn run(&self, spec: &SandboxSpec, options: &RunOptions<'_>) -> Result<Outcome> {
        if let Some(notice) = &options.notice {
            eprintln!("{notice}");
        }
        if spec.keep.is_some() {
            return super::qemu_kept::run(&self.store, spec, options).await;
        }
        // A warm VM's root is built before the run is known: a run that
        // brings files or secret files boots its own (and one with an
        // egress proxy: the CLI never offers it the pool).
        if options.warm_pool
            && options.files.is_empty()
            && options.secret_files.is_empty()
            && proxied(spec).is_none()
        {
            return super::qemu_pool::run(&self.store, spec, options).await;
        }
        run(spec, options).await
    }

    async fn exec(&self, record: &SandboxRecord, request: &ExecRequest) -> Result<Outcome> {
        // With --receipt and a proxy, the command's traffic goes into it.
        let command = async { super::qemu_kept::exec(&self.store, &record.name, request) };
        agentkernel_native::egress::observing_kept(&self.store, &record.name, command).await
    }

    async fn create(
        &self,
        spec: &SandboxSpec,
        options: &RunOptions<'_>,
        reserved: &dyn Fn() -> Result<()>,
    ) -> Result<()> {
        if let Some(notice) = &options.notice {
            eprintln!("{notice}");
        }
        super::qemu_kept::create(&self.store, spec, options, reserved).await?;
        Ok(())
    }

    async fn stop(&self, name: &str) -> Result<usize> {
        let ended = kept::stop(&self.store, name).map_err(backend_error)?;
        Ok(ended as usize)
    }

    async fn pause(&self, name: &str) -> Result<()> {
        kept::set_paused(&self.store, name, true).map_err(backend_error)
    }

    async fn resume(&self, name: &str) -> Result<()> {
        kept::set_paused(&self.store, name, false).map_err(backend_error)
    }

    async fn copy_in(&self, _name: &str, _host: &Path, _path: &str) -> Result<()> {
        Err(no_copy())
    }

    async fn copy_out(&self, _name: &str, _path: &str, _host: &Path) -> Result<()> {
        Err(no_copy())
    }

    async fn remove(&self, name: &str) -> Result<()> {
        kept::remove(&self.store, name).map_err(backend_error)
    }

    async fn status(&self, record: &SandboxRecord) -> Result<Option<String>> {
        Ok(kept::status(&self.store, &record.name).map(str::to_string))
    }

    async fn gc(&self) -> Result<Collected> {
        Ok(Collected {
            containers: 0,
            // Leases (addresses, port rules) of VMs whose holder was killed.
            directories: kept::collect(&self.store)
                + super::qemu_pool::collect(&self.store)
                + agentkernel_native::net::collect_dead(),
        })
    }

    async fn probe(&self) -> Result<Probe> {
        // A trial VM costs seconds under TCG: say what a run would use.
        Ok(Probe::Untested {
            detail: doctor()?,
            fix: "try it: agentkernel run -B qemu -i IMAGE true".into(),
        })
    }
}

/// What a VM started without root can have: a network through passt
/// (`agentkernel_vm::passt`) when it is installed, and no published ports
/// (passt could bind them, but native refuses them rootless too: one rule).
/// As root: everything.
fn capabilities_for_this_user() -> Capabilities {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Capabilities::all();
    }
    Capabilities {
        network: match agentkernel_vm::passt::usable() {
            Ok(_) => Support::Yes,
            Err(why) => Support::no(
                format!("for a VM without root here: {why}"),
                "or pass --no-network",
            ),
        },
        published_ports: Support::no(
            "from a VM without root",
            "run agentkernel as root, or reach the service from inside the sandbox",
        ),
        ..Capabilities::all()
    }
}

fn no_copy() -> Error {
    Error::not_supported_hint(
        "sandbox cp on the qemu backend",
        "copy through the workspace (-B qemu shares it with the VM), or use -B native",
    )
}

/// A one-shot run in a VM booted for it.
pub async fn run(spec: &SandboxSpec, options: &RunOptions<'_>) -> Result<Outcome> {
    let (host, mut vm, request) = prepare(spec, options.config, &options.files).await?;
    let mut request = with_terminal(request, spec.exec.tty);
    request.secret_files = SecretFile::all(&options.secret_files);
    let Some(egress) = proxied(spec) else {
        let ended = session::run(&host.qemu, &vm, request, None).map_err(backend_error)?;
        return Ok(outcome(ended));
    };
    // Last before the boot, as on native: nothing after it fails but the
    // VM, and the proxy ends with this process (its lifeline) either way.
    let reports = agentkernel_native::egress::Reports {
        socket: None,
        final_report: agentkernel_core::observe::enabled(),
    };
    let proxy = agentkernel_native::egress::start(egress, options.secrets, reports)?;
    agentkernel_native::egress::expect_connections(&proxy.handoff).map_err(|e| Error::Backend {
        backend: "egress proxy",
        message: format!("cannot reach it: {e}"),
    })?;
    with_proxy(&mut vm, &mut request, egress, &proxy.ca_pem);
    let ended = session::run(&host.qemu, &vm, request, Some(proxy.handoff));
    // The proxy ends (and drains into its report) once this is closed.
    drop(proxy.lifeline);
    if let Some(pipe) = proxy.final_report {
        let report = tokio::task::spawn_blocking(move || {
            agentkernel_native::egress::read_final_report(pipe)
        })
        .await;
        agentkernel_core::observe::egress(agentkernel_native::egress::report_json(
            report.ok().flatten(),
        ));
    }
    Ok(outcome(ended.map_err(backend_error)?))
}

/// The spec's egress plan when it needs the proxy (-S, --allow-host, --egress-log).
pub(super) fn proxied(spec: &SandboxSpec) -> Option<&EgressSpec> {
    spec.egress.as_ref().filter(|e| e.needs_proxy())
}

/// A VM behind the egress proxy, as native's sandbox: the agent listens on
/// the proxy's port on the guest's loopback (and carries what connects to
/// the proxy), the root trusts the proxy's CA, the command has native's
/// proxy variables; under an allow-list the VM has no NIC, so the proxy is
/// its only way out.
pub(super) fn with_proxy(
    vm: &mut VmConfig,
    request: &mut RunRequest,
    egress: &EgressSpec,
    ca_pem: &str,
) {
    if !egress.allow_hosts.is_empty() {
        vm.network = None;
    }
    request.egress_port = Some(agentkernel_native::egress::PROXY_PORT);
    request.egress_ca = Some(ca_pem.to_string());
    // Later entries win in the guest, as the run's own variables do.
    for (key, value) in agentkernel_native::egress::environment() {
        request.env.push(format!("{key}={value}"));
    }
}

/// `request` as one command's: with a terminal in the guest when `tty`
/// (the CLI asks for one when it runs on a terminal) of our window's size,
/// and TERM as native sets it. Per command, never in a sandbox's base
/// request: a kept sandbox's later commands and a pool key do not inherit it.
pub(super) fn with_terminal(mut request: RunRequest, tty: bool) -> RunRequest {
    request.tty = tty.then(|| session::window_size().unwrap_or_default());
    if tty && !request.env.iter().any(|e| e.starts_with("TERM=")) {
        request.env.push("TERM=xterm".into());
    }
    request
}

pub(super) fn backend_error(e: agentkernel_vm::Error) -> Error {
    Error::Backend {
        backend: "qemu",
        message: e.0,
    }
}

pub(super) fn outcome(ended: Ended) -> Outcome {
    match ended {
        Ended::Exited(code) => Outcome::Exited(code),
        Ended::Signaled(signal) => Outcome::Exited(128 + signal),
        Ended::TimedOut => Outcome::TimedOut,
        Ended::OutOfMemory => Outcome::OutOfMemory,
    }
}

/// What a VM for `spec` boots, and the agent's request for its command
/// (with the `[[files]]` to write before it).
pub(super) async fn prepare(
    spec: &SandboxSpec,
    config: &Config,
    files: &[agentkernel_core::files::InjectedFile],
) -> Result<(Host, VmConfig, RunRequest)> {
    refuse_unsupported(spec)?;
    // The guest's kernel and agent live in GUEST_OVERHEAD: however small
    // --memory is, it limits the command (a cgroup in the guest), not the boot.
    let memory = spec.policy.limits.memory_bytes.unwrap_or(DEFAULT_MEMORY);
    let host = Host::find(config.qemu_kernel.as_ref())?;
    let image = fetch_image(spec, config).await?;
    agentkernel_native::trace::phase("image resolved");
    let vm_dir = agentkernel_native::images::open_store()?.root().join("vm");
    let id = image.config_digest.hex().to_string();
    let disk = disk::ensure(&vm_dir.join("disks"), &id, &image.layers).map_err(backend_error)?;
    let initramfs = initramfs::ensure(&vm_dir, &host.agent, &host.kernel).map_err(backend_error)?;
    let (accel, _) = vmm::choose_accel(&vm_dir, &host.qemu, &host.kernel.image);
    let machine = vmm::Machine::choose(accel).map_err(backend_error)?;
    if agentkernel_native::trace::enabled() {
        agentkernel_native::trace::phase(&format!(
            "disk, initramfs and accelerator ready ({}, guest kernel {})",
            accel.name(),
            host.kernel.describe()
        ));
    }
    let workspace = spec.workspace.as_ref().map(|w| {
        let share_read_only = spec.policy.workspace != WorkspaceMode::ReadWrite;
        (w.host.clone(), share_read_only)
    });
    let boot_kernel =
        kernel::uncompressed(&vm_dir, &host.kernel).unwrap_or_else(|| host.kernel.image.clone());
    let vm = VmConfig {
        kernel: boot_kernel,
        initramfs,
        disk,
        memory_mib: (memory + GUEST_OVERHEAD) >> 20,
        vcpus: vcpus(accel, spec.policy.limits.cpus),
        workspace,
        volumes: shares(spec)
            .map(|(host, _, read_only)| (host, read_only))
            .collect(),
        accel,
        machine,
        tsc_khz: match accel {
            vmm::Accel::Tcg => agentkernel_vm::host_clock::host_tsc_khz(&vm_dir),
            vmm::Accel::Kvm => None,
        },
        network: spec
            .policy
            .network
            .then(|| agentkernel_vm::net::Network { ports: ports(spec) }),
    };
    let request = RunRequest {
        files: files.to_vec(),
        ..request(spec, &image.config)
    };
    Ok((host, vm, request))
}

/// The VM's vCPUs: the CPU limit rounded up under KVM. Under TCG one: a
/// second emulated CPU slowed every boot (its bring-up and the checks
/// across CPUs are emulated too), and a guest with two vCPUs was seen
/// spinning on both for good on a busy host; the command's CPU limit is
/// `cpu.max` of its cgroup in the guest either way.
fn vcpus(accel: vmm::Accel, cpus: Option<f64>) -> u32 {
    match accel {
        vmm::Accel::Tcg => 1,
        vmm::Accel::Kvm => cpus.map_or(1, |c| c.ceil().max(1.0) as u32),
    }
}

/// What every VM needs from the host.
pub(super) struct Host {
    pub(super) qemu: Qemu,
    kernel: kernel::Kernel,
    agent: std::path::PathBuf,
}

impl Host {
    /// `chosen`: `[qemu] kernel` from the config, which
    /// `$AGENTKERNEL_QEMU_KERNEL` (and `$AGENTKERNEL_QEMU_MODULES`) replace.
    fn find(chosen: Option<&QemuKernel>) -> Result<Host> {
        let unavailable = |e: agentkernel_vm::Error, fix: &str| Error::BackendUnavailable {
            backend: "qemu".into(),
            why: e.0,
            fix: fix.into(),
        };
        let qemu = Qemu::find().map_err(|e| unavailable(e, "or choose another backend with -B"))?;
        let from_env = std::env::var_os("AGENTKERNEL_QEMU_KERNEL")
            .filter(|k| !k.is_empty())
            .map(|k| QemuKernel {
                image: k.into(),
                modules: std::env::var_os("AGENTKERNEL_QEMU_MODULES")
                    .filter(|m| !m.is_empty())
                    .map(Into::into),
            });
        let kernel = match from_env.as_ref().or(chosen) {
            Some(k) => {
                kernel::chosen(&k.image, k.modules.as_deref()).map_err(|e| Error::Backend {
                    backend: "qemu",
                    message: e.0,
                })?
            }
            None => {
                kernel::find().map_err(|e| unavailable(e, "or choose another backend with -B"))?
            }
        };
        let agent = guest_agent()?;
        Ok(Host {
            qemu,
            kernel,
            agent,
        })
    }

    /// One line for `doctor`.
    fn describe(&self, vm_dir: &std::path::Path) -> String {
        let (accel, why) = vmm::choose_accel(vm_dir, &self.qemu, &self.kernel.image);
        let kernel = self.kernel.describe();
        let firmware = match (
            vmm::Machine::choose(accel),
            vmm::fast_firmware(&self.qemu.binary),
        ) {
            (Ok(vmm::Machine::Microvm), _) => "machine microvm".to_string(),
            (Err(e), _) => format!("machine unknown ({e})"),
            (Ok(vmm::Machine::Pc), Some(rom)) => format!("machine pc, firmware {}", rom.display()),
            (Ok(vmm::Machine::Pc), None) => "machine pc, SeaBIOS (qboot.rom not found)".to_string(),
        };
        format!(
            "{}, {firmware}, guest kernel {kernel}, {} ({why})",
            self.qemu.binary.display(),
            accel.name().to_uppercase()
        )
    }
}

/// `$AGENTKERNEL_GUEST_AGENT`, else `agentkernel-guest` beside this binary
/// (cargo builds and installs both).
fn guest_agent() -> Result<std::path::PathBuf> {
    let path = match std::env::var_os("AGENTKERNEL_GUEST_AGENT") {
        Some(p) => std::path::PathBuf::from(p),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("agentkernel-guest")))
            .unwrap_or_default(),
    };
    if path.is_file() {
        return Ok(path);
    }
    Err(Error::BackendUnavailable {
        backend: "qemu".into(),
        why: format!("the guest agent {} is missing", path.display()),
        fix: "install agentkernel-guest beside agentkernel (cargo install builds both) or set AGENTKERNEL_GUEST_AGENT".into(),
    })
}

/// `doctor`'s line for this backend: what it would use, or why it cannot.
pub fn doctor() -> std::result::Result<String, Error> {
    // The kernel a run from here would boot: the config files' choice.
    let config = std::env::current_dir()
        .ok()
        .and_then(|cwd| Config::load(&cwd, None).ok())
        .unwrap_or_default();
    let host = Host::find(config.qemu_kernel.as_ref())?;
    let vm_dir = agentkernel_native::images::open_store()?.root().join("vm");
    Ok(host.describe(&vm_dir))
}

/// Everything a VM does not do yet: refused, never silently dropped.
fn refuse_unsupported(spec: &SandboxSpec) -> Result<()> {
    let refuse = |what: &str, hint: &str| {
        Err(Error::not_supported_hint(
            format!("{what} on the qemu backend"),
            hint,
        ))
    };
    if spec.image == agentkernel_native::prepare::HOST_IMAGE {
        return refuse(
            "--image host",
            "a VM boots its own kernel and cannot show the host's root; choose an image with -i",
        );
    }
    // A VM shares directories (9p); sharing a file's directory instead
    // would show the guest its siblings.
    if let Some(file) = spec.volumes.iter().find(|v| !v.host.is_dir()) {
        return refuse(
            &format!("-v of a file ({})", file.host.display()),
            "a VM shares directories: mount the directory that holds it",
        );
    }
    if spec.policy.user_limits.disk_bytes.is_some() {
        return refuse(
            "--disk",
            "a VM's writable layers live in its RAM, bounded by --memory; drop --disk",
        );
    }
    Ok(())
}

/// The host directories a VM shares besides the workspace, in mount order:
/// the home directory (read-only, where the profile shows it) and the
/// volumes (`-v`), each as (host directory, path in the sandbox, read-only).
fn shares(spec: &SandboxSpec) -> impl Iterator<Item = (std::path::PathBuf, String, bool)> + '_ {
    let home = spec
        .home
        .iter()
        .map(|home| (home.clone(), home.to_string_lossy().into_owned(), true));
    let volumes = spec
        .volumes
        .iter()
        .map(|v| (v.host.clone(), v.container.clone(), v.read_only));
    home.chain(volumes)
}

/// `-P` as native takes it (checked by the CLI: IPv4, and only with a network).
fn ports(spec: &SandboxSpec) -> Vec<agentkernel_native::plan::Port> {
    spec.ports
        .iter()
        .filter_map(|p| {
            // `admit` refused IPv6 addresses (`ipv6_ports`).
            Some(agentkernel_native::plan::Port {
                host_ip: p.host_ip.parse().ok()?,
                host_port: p.host_port,
                container_port: p.container_port,
                udp: p.protocol == agentkernel_core::parse::Protocol::Udp,
            })
        })
        .collect()
}

async fn fetch_image(spec: &SandboxSpec, config: &Config) -> Result<images::Image> {
    let image = agentkernel_native::images::fetch_for_run(spec, config).await?;
    if image.markers.iter().any(|m| !m.is_empty()) {
        return Err(Error::Image {
            image: spec.image.clone(),
            why: "its layers were unpacked without root, so their deletions cannot be applied"
                .into(),
            fix: "remove it with `agentkernel image rm` and pull it again as root".into(),
        });
    }
    Ok(image)
}

/// The agent's request: Docker's entrypoint/cmd rules, the image's
/// environment under the run's, the profile's root and workspace.
fn request(spec: &SandboxSpec, image: &images::ImageConfig) -> RunRequest {
    let command = if spec.exec.argv.is_empty() {
        image.cmd.clone()
    } else {
        spec.exec.argv.clone()
    };
    let argv = image.entrypoint.iter().cloned().chain(command).collect();
    let mut env = vec![DEFAULT_PATH.to_string()];
    env.extend(image.env.iter().cloned());
    env.extend(spec.exec.env.iter().map(|(k, v)| format!("{k}={v}")));
    let workdir = spec
        .exec
        .workdir
        .clone()
        .or_else(|| image.working_dir.clone().filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".into());
    let policy = &spec.policy;
    RunRequest {
        argv,
        env,
        workdir,
        user: image.user.clone(),
        timeout_ms: spec.exec.timeout.map(|t| t.as_millis() as u64),
        root: if policy.read_only_root {
            RootMode::ReadOnly
        } else {
            RootMode::Overlay
        },
        tmp_bytes: policy.tmp_size_bytes,
        volumes: shares(spec)
            .map(|(_, path, read_only)| protocol::Volume { path, read_only })
            .collect(),
        workspace: spec.workspace.as_ref().map(|w| protocol::Workspace {
            path: w.path_in_sandbox.clone(),
            mode: match policy.workspace {
                WorkspaceMode::ReadWrite => protocol::WorkspaceMode::ReadWrite,
                WorkspaceMode::CopyOnWrite => protocol::WorkspaceMode::CopyOnWrite,
                WorkspaceMode::ReadOnly => protocol::WorkspaceMode::ReadOnly,
            },
        }),
        no_new_privileges: policy.no_new_privileges,
        // Negative means unlimited, as in the native backend.
        pids_max: policy.limits.pids.and_then(|p| u64::try_from(p).ok()),
        memory_max: Some(policy.limits.memory_bytes.unwrap_or(DEFAULT_MEMORY)),
        cpu_max: policy.limits.cpus,
        // Set by `prepare`.
        files: Vec::new(),
        // A one-shot run's: `run`; a kept VM's go to its holder by a pipe.
        secret_files: Vec::new(),
        capabilities: agentkernel_native::caps::kept(&policy.capabilities),
        seccomp_restrictive: policy.seccomp == agentkernel_core::policy::Seccomp::Restrictive,
        // Filled in by whoever boots the VM and holds its lease.
        network: None,
        // Per command: `with_terminal`.
        tty: None,
        // A one-shot run's, with its proxy: `with_proxy`.
        egress_port: None,
        egress_ca: None,
    }
}
