//! From a backend-neutral [`SandboxSpec`] and an image to a [`Plan`].

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use agentkernel_core::backend::BackendKind;
use agentkernel_core::parse::Protocol;
use agentkernel_core::policy::{Seccomp, WorkspaceMode};
use agentkernel_core::spec::{ExecRequest, SandboxSpec};
use agentkernel_core::state::{SandboxRecord, Store};
use agentkernel_core::{names, Error, Result};

use crate::plan::{
    Action, CgroupLimits, KeepPlan, Mount, MountKind, Plan, Port, RootSource, SeccompMode,
};
use crate::rootless::UserMap;

/// The image name that means "this machine's own root filesystem".
pub const HOST_IMAGE: &str = "host";

/// What the runtime needs of an image.
#[derive(Debug, Clone, Default)]
pub struct ImageRoot {
    /// Layer directories bottom to top; empty for the host image.
    pub layers: Vec<PathBuf>,
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// Builds the plan and the run's scratch directory. Without root, the plan
/// is a rootless one (see rootless.rs), and what it cannot enforce is either
/// an error or, for the profile's default limits, a notice printed here.
/// What a plan holds on the host until the helper takes it over: the kept
/// sandbox's name reservation and the scratch directory. Released when
/// dropped — on every error path, and when the helper cannot be started; a
/// successful hand-off replaces the process, so it is never dropped then.
pub struct HostClaim {
    store: Store,
    name: Option<String>,
    scratch: Option<PathBuf>,
    /// The scratch holds a device claimed from the disk pool.
    pooled: bool,
}

impl HostClaim {
    /// The helper ran and owns the name and scratch now (an observed run's
    /// helper is a child that returned): nothing to release.
    pub fn hand_over(mut self) {
        self.scratch = None;
        self.name = None;
    }
}

impl Drop for HostClaim {
    fn drop(&mut self) {
        if let Some(scratch) = &self.scratch {
            let _ = std::fs::remove_dir_all(scratch);
            if self.pooled {
                // Its image is gone with the scratch: let the device go.
                crate::disk_pool::sweep();
            }
        }
        if let Some(name) = &self.name {
            let _ = self.store.forget(name);
        }
    }
}

/// The plan for `spec`, and the claim on the host it holds.
pub fn plan(spec: &SandboxSpec, image: &ImageRoot, store: &Store) -> Result<(Plan, HostClaim)> {
    crate::disk_keeper::check_switch()?;
    let rootless = UserMap::for_caller();
    // What this backend cannot enforce was refused or dropped by
    // `backend::admit` (see `NativeBackend::capabilities`); the image's
    // user is the one check that needs the image.
    if rootless.is_some() {
        check_rootless_image(image)?;
    }
    let limits = spec.policy.limits;
    let ports = spec
        .ports
        .iter()
        .map(|p| {
            let host_ip = p.host_ip.parse().map_err(|_| {
                Error::not_supported_hint(
                    format!("publishing on {} (IPv6) on the native backend", p.host_ip),
                    "use an IPv4 address such as 127.0.0.1 or 0.0.0.0",
                )
            })?;
            Ok(Port {
                host_ip,
                host_port: p.host_port,
                container_port: p.container_port,
                udp: p.protocol == Protocol::Udp,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let id = match &spec.keep {
        Some(k) => k.name.clone(),
        None => names::generated(),
    };
    let scratch_path = match &spec.keep {
        Some(k) => store.sandbox_dir(&k.name).join("scratch"),
        None => store.root().join("runs").join(&id),
    };
    let mut mounts = Vec::new();
    if let Some(ws) = &spec.workspace {
        let kind = match spec.policy.workspace {
            WorkspaceMode::ReadWrite => MountKind::Bind { read_only: false },
            WorkspaceMode::ReadOnly => MountKind::Bind { read_only: true },
            WorkspaceMode::CopyOnWrite => {
                check_copy_on_write_source(&ws.host, &scratch_path)?;
                MountKind::CopyOnWrite
            }
        };
        mounts.push(Mount {
            host: ws.host.clone(),
            target: ws.path_in_sandbox.clone(),
            kind,
        });
    }
    if let Some(home) = &spec.home {
        mounts.push(Mount {
            host: home.clone(),
            target: home.to_string_lossy().into_owned(),
            kind: MountKind::Bind { read_only: true },
        });
    }
    for v in &spec.volumes {
        mounts.push(Mount {
            host: v.host.clone(),
            target: v.container.clone(),
            kind: MountKind::Bind {
                read_only: v.read_only,
            },
        });
    }

    let root = if image.layers.is_empty() {
        RootSource::Host
    } else {
        RootSource::Layers(image.layers.clone())
    };
    let hostname = id.clone();
    let PerRun {
        argv,
        env,
        workdir,
        user,
    } = PerRun::of(spec, image, &hostname);
    let capabilities = crate::caps::kept(&spec.policy.capabilities);
    // The disk cap of a copy-on-write workspace needs a loop-mounted
    // filesystem (disk.rs), which a user namespace cannot mount. Its
    // template is formatted (once per size) before anything is reserved.
    let has_cow_workspace = mounts
        .iter()
        .any(|m| matches!(m.kind, MountKind::CopyOnWrite));
    let mut notice = None;
    if let (Some(bytes), Some(_), true) =
        (spec.policy.limits.disk_bytes, rootless, has_cow_workspace)
    {
        notice = Some(format!(
            "agentkernel: rootless: the {} profile's disk cap ({}) covers the root filesystem but not the copy-on-write workspace, which needs root for it",
            spec.policy.profile.as_str(),
            agentkernel_core::parse::format_bytes(bytes)
        ));
    }
    let disk_template = match (spec.policy.limits.disk_bytes, rootless) {
        (Some(bytes), None) if has_cow_workspace => {
            Some((crate::disk::template(store.root(), bytes)?, bytes))
        }
        _ => None,
    };
    let mut claim = HostClaim {
        store: store.clone(),
        name: None,
        scratch: None,
        pooled: false,
    };
    let keep = match &spec.keep {
        Some(k) => {
            // The atomic name reservation: a clash is an error naming the fix.
            store.reserve(&k.name)?;
            claim.name = Some(k.name.clone());
            Some(KeepPlan {
                name: k.name.clone(),
                ttl: k.ttl,
                state_root: store.root().to_path_buf(),
                record: SandboxRecord::for_kept(spec, BackendKind::Native, String::new()),
                reused: false,
                setup: k.setup.clone(),
                warm: false,
            })
        }
        None => None,
    };
    // `layer` is the mount point of the root's tmpfs layer (see rootfs.rs).
    let scratch = match &keep {
        Some(_) => {
            let mkdir = |p: &Path, mode| {
                std::fs::DirBuilder::new()
                    .mode(mode)
                    .create(p)
                    .map_err(|e| Error::state(p, e))
            };
            mkdir(&scratch_path, 0o700)?;
            mkdir(&scratch_path.join("layer"), 0o755)?;
            scratch_path
        }
        None => store.run_scratch(&id, &["layer"])?,
    };
    claim.scratch = Some(scratch.clone());
    crate::trace::phase("cli: scratch dir made");
    let mut workspace_device = None;
    let mut workspace_held = false;
    let workspace_disk = match &disk_template {
        Some(_) if keep.is_none() && crate::disk_keeper::serving(store.root()) => {
            // A one-shot run takes a disk the keeper mounted ahead.
            workspace_held = true;
            let image = crate::disk::prepare_held_image(&scratch)?;
            crate::trace::phase("cli: workspace disk image made");
            Some(image)
        }
        Some((template, bytes)) => {
            // A one-shot run takes a device attached ahead, if one is ready.
            let pooled = match &keep {
                None => crate::disk::claim_workspace_image(store.root(), &scratch, *bytes)
                    .map_err(|e| Error::state(&scratch, e))?,
                Some(_) => None,
            };
            let image = match pooled {
                Some((image, device)) => {
                    workspace_device = Some(device);
                    claim.pooled = true;
                    Ok(image)
                }
                None => crate::disk::create_workspace_image(template, &scratch, *bytes),
            };
            crate::trace::phase("cli: workspace disk image made");
            Some(image?)
        }
        None => None,
    };
    if let Some(notice) = notice {
        eprintln!("{notice}");
    }
    // With an egress allow-list the sandbox has loopback only: the proxy,
    // listening there, is its one way out (and resolves names for it).
    let network = spec.policy.network
        && spec
            .egress
            .as_ref()
            .is_none_or(|egress| egress.allow_hosts.is_empty());
    let capabilities = without_raw_packets_through_slirp(capabilities, network, &rootless);
    let plan = Plan {
        action: if keep.is_some() {
            Action::CreateKept
        } else {
            Action::Run
        },
        keep,
        id,
        scratch,
        hidden: match &root {
            RootSource::Host => vec![store.root().to_string_lossy().into_owned()],
            RootSource::Layers(_) => Vec::new(),
        },
        root,
        read_only_root: spec.policy.read_only_root,
        tmp_size_bytes: spec.policy.tmp_size_bytes,
        mounts,
        hostname,
        network,
        ports,
        resolv_conf: match (network, rootless) {
            (false, _) => None,
            (true, None) => Some(agentkernel_net::resolv_conf()),
            (true, Some(_)) => Some(crate::slirp::RESOLV_CONF.to_string()),
        },
        argv,
        env,
        workdir,
        user,
        capabilities,
        no_new_privileges: spec.policy.no_new_privileges,
        seccomp: match spec.policy.seccomp {
            Seccomp::EngineDefault => SeccompMode::Default,
            Seccomp::Restrictive => SeccompMode::Restrictive,
        },
        limits: CgroupLimits {
            memory_bytes: limits.memory_bytes,
            cpus: limits.cpus,
            pids: limits.pids,
        },
        root_layer_bytes: spec.policy.limits.disk_bytes,
        workspace_disk,
        workspace_disk_bytes: disk_template.as_ref().map(|(_, bytes)| *bytes),
        workspace_device,
        workspace_held,
        tty: spec.exec.tty,
        timeout: spec.exec.timeout,
        claimed_warm: false,
        rootless,
        // The proxy is started by the caller, which holds the secret values.
        egress: None,
        secret_files: Vec::new(),
        files: Vec::new(),
    };
    Ok((plan, claim))
}

/// A rootless sandbox with a network never keeps CAP_NET_RAW (permissive
/// would): slirp4netns opens a host socket to whatever address a packet is
/// for, and its `--disable-host-loopback` covers only the gateway's
/// address, so a hand-made SYN for 127.0.0.1 sent out of the sandbox's tap
/// reached the host's loopback (seen: it got its SYN-ACK). Without raw
/// sockets the command's packets follow the sandbox's own routing, where
/// 127.0.0.0/8 is its own `lo`. (A nested user namespace does not give the
/// capability back: raw sockets need it in the user namespace that owns the
/// network namespace.) As root the bridge's rules stop such packets.
fn without_raw_packets_through_slirp(
    mut capabilities: Vec<String>,
    network: bool,
    rootless: &Option<UserMap>,
) -> Vec<String> {
    if network && rootless.is_some() {
        capabilities.retain(|c| c != "NET_RAW");
    }
    capabilities
}

/// What a rootless sandbox cannot do with this image, refused before
/// anything is created.
fn check_rootless_image(image: &ImageRoot) -> Result<()> {
    if let Some(user) = image.user.as_deref().filter(|u| !u.is_empty()) {
        let (name, group) = user.split_once(':').unwrap_or((user, "0"));
        let is_root = |id: &str| id == "0" || id == "root";
        if !is_root(name) || !is_root(group) {
            return Err(Error::not_supported_hint(
                format!("the image's user {user} in a rootless native sandbox, where only root (your own uid) exists"),
                "run agentkernel as root, or use -B podman / -B docker",
            ));
        }
    }
    Ok(())
}

/// Sets `key=value`, replacing an earlier value of `key`.
fn set_env(env: &mut Vec<String>, key: &str, value: &str) {
    env.retain(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) != key);
    env.push(format!("{key}={value}"));
}

/// The plan for one more command in a kept sandbox: the sandbox's own plan
/// with this command's argv, `-e` (over the sandbox's env), workdir, TTY and
/// timeout.
pub fn for_command(sandbox: &Plan, request: &ExecRequest) -> Plan {
    let mut plan = sandbox.clone();
    plan.action = Action::Exec;
    plan.argv = request.argv.clone();
    for (k, v) in &request.env {
        set_env(&mut plan.env, k, v);
    }
    if let Some(w) = &request.workdir {
        plan.workdir = w.clone();
    }
    plan.tty = request.tty;
    plan.timeout = request.timeout;
    if request.user.is_some() {
        plan.user = request.user.clone();
    }
    plan
}

/// What a one-shot run chooses for its command, apart from the sandbox:
/// the same whether the sandbox is built for it or claimed from the pool.
pub(crate) struct PerRun {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub workdir: String,
    pub user: Option<String>,
}

impl PerRun {
    pub fn of(spec: &SandboxSpec, image: &ImageRoot, hostname: &str) -> PerRun {
        PerRun {
            argv: if spec.exec.argv.is_empty() {
                image.entrypoint.iter().chain(&image.cmd).cloned().collect()
            } else {
                spec.exec.argv.clone()
            },
            env: environment(spec, image, hostname),
            workdir: spec
                .exec
                .workdir
                .clone()
                .or_else(|| image.working_dir.clone().filter(|w| w.starts_with('/')))
                .unwrap_or_else(|| "/".to_string()),
            user: image.user.clone().filter(|u| !u.is_empty()),
        }
    }
}

/// Image env, then the user's `-e` (which wins), then what Docker adds.
fn environment(spec: &SandboxSpec, image: &ImageRoot, hostname: &str) -> Vec<String> {
    let mut env: Vec<String> = image.env.clone();
    for (k, v) in &spec.exec.env {
        set_env(&mut env, k, v);
    }
    let has = |env: &[String], key: &str| env.iter().any(|e| e.starts_with(&format!("{key}=")));
    if !has(&env, "PATH") {
        env.insert(0, format!("PATH={}", crate::DEFAULT_PATH));
    }
    if !has(&env, "HOSTNAME") {
        env.push(format!("HOSTNAME={hostname}"));
    }
    if spec.exec.tty && !has(&env, "TERM") {
        env.push("TERM=xterm".to_string());
    }
    if spec.egress.as_ref().is_some_and(|e| e.needs_proxy()) {
        for (key, value) in crate::egress::environment() {
            set_env(&mut env, key, &value);
        }
    }
    env
}

/// overlayfs cannot stack a directory over a layer that contains its own
/// upper directory, and its option syntax reserves `,` and `:`.
fn check_copy_on_write_source(host: &Path, scratch: &Path) -> Result<()> {
    if scratch.starts_with(host) {
        return Err(Error::Conflict(format!(
            "the copy-on-write workspace {} contains agentkernel's state directory; run from a project directory or set AGENTKERNEL_HOME elsewhere",
            host.display()
        )));
    }
    let text = host.to_string_lossy();
    if text.contains([',', ':', '\\']) {
        return Err(Error::Conflict(format!(
            "the copy-on-write workspace {text} has a `,`, `:` or `\\` in its path, which overlayfs cannot take; use --profile permissive (read-write) or rename the directory"
        )));
    }
    Ok(())
}
