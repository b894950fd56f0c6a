//! Spec → Docker container configuration. Every row of the profile table
//! (docs/security.md) that Docker can enforce is enforced here.

use std::collections::HashMap;
use std::path::Path;

use agentkernel_core::policy::{Capabilities, Seccomp, WorkspaceMode};
use agentkernel_core::spec::SandboxSpec;
use agentkernel_core::{Error, Result};
use bollard::models::{
    ContainerCreateBody, HostConfig, Mount, MountType, MountVolumeOptions,
    MountVolumeOptionsDriverConfig, PortBinding, ResourcesUlimits,
};

use crate::engine::Flavor;

/// Where a kept sandbox's control directory (its deadline) appears inside it.
pub const CONTROL_MOUNT: &str = "/run/agentkernel";

/// The main process of a container that waits for commands (kept sandboxes,
/// warm pool containers): it exits — and the engine auto-removes the container
/// — when the deadline in the control mount passes, unless the container has
/// been claimed from the pool (`claimed/` exists), in which case its one
/// command decides its end. Needs `/bin/sh`, `date`, `cat` and `sleep`.
pub fn keep_alive_command() -> Vec<String> {
    let script = format!(
        "trap 'exit 0' TERM INT HUP; \
         while :; do \
           if [ -d {CONTROL_MOUNT}/claimed ]; then sleep 2 & wait $!; continue; fi; \
           now=$(date +%s); d=$(cat {CONTROL_MOUNT}/deadline 2>/dev/null || echo 0); \
           [ \"$now\" -ge \"$d\" ] && exit 0; \
           s=$((d - now)); [ \"$s\" -gt 2 ] && s=2; \
           sleep \"$s\" & wait $!; \
         done"
    );
    vec!["/bin/sh".into(), "-c".into(), script]
}

/// The longest a warm container's idle loop sleeps between looks at its
/// deadline. Its naps double from 2 s up to this: the first looks catch the
/// deadline the refill rewrites once the container has started (see
/// `pool::create_warm`), and later ones cost nearly nothing, where a look
/// every 2 s (three processes) from each of 64 warm containers kept 8% of a
/// 2-core host busy and slowed every other sandbox's start on it. Nothing
/// moves a warm container's deadline after that rewrite, and a claim wakes
/// the loop at once (SIGUSR1), so the longer naps change no behaviour.
const LONGEST_IDLE_NAP_SECS: u32 = 64;

/// Where a claimed warm container finds its one command (see [`crate::handoff`]).
pub const RUN_DIR: &str = "/run/agentkernel/run";

/// The main process of a warm pool container: [`keep_alive_command`]'s
/// loop, plus a SIGUSR1 handler through which the claimant hands it its one
/// command (see [`crate::handoff`]), so the run needs no engine exec. On the
/// signal it reads argv, workdir and env from [`RUN_DIR`] (one file per
/// value, each followed by a newline: read with the `read` builtin, no
/// quoting or evaluation), runs the command under the engine's init exactly
/// as an exec would (`init_prefix ARGV`, see [`crate::exec::exec_prefix`]) with stdin, stdout and stderr on the FIFOs there,
/// and reports `run` and then the exit status on the `status` FIFO. It
/// reports `fallback` instead, before running anything, when it cannot give
/// the command what an exec would (bash as `/bin/sh` exports `_`; a
/// workdir it cannot enter): the claimant then execs as before. It stays
/// alive afterwards, like a container served by exec, until it is removed.
/// The shell's own variables are `__ak_*`; it drops the `PWD`, `OLDPWD` and
/// `SHLVL` it sets itself (the claimant takes the exec path when the image
/// sets them). Needs `/bin/sh`, `date`, `cat` and `sleep` (and `mkdir` for
/// a missing workdir).
pub fn serving_keep_alive_command(init_prefix: &[&str]) -> Vec<String> {
    let r = RUN_DIR;
    // Constant paths and flags of our own, never user input: safe to splice.
    let init = init_prefix.join(" ");
    let script = format!(
        "__ak_read() {{ \
           __ak_a=; __ak_n=; \
           while IFS= read -r __ak_l; do __ak_a=\"$__ak_a$__ak_n$__ak_l\"; __ak_n='\n'; done <\"$1\"; \
         }}; \
         __ak_serve() {{ \
           [ -n \"$__ak_served\" ] && return; __ak_served=1; \
           kill $__ak_idle 2>/dev/null; \
           if [ -n \"$BASH_VERSION\" ]; then echo fallback >{r}/status; return; fi; \
           set --; __ak_i=0; \
           while [ -e {r}/argv/$__ak_i ]; do \
             __ak_read {r}/argv/$__ak_i; set -- \"$@\" \"$__ak_a\"; __ak_i=$((__ak_i + 1)); \
           done; \
           if [ -e {r}/workdir ]; then \
             __ak_read {r}/workdir; \
             [ -d \"$__ak_a\" ] || mkdir -p \"$__ak_a\" 2>/dev/null; \
             cd \"$__ak_a\" 2>/dev/null || {{ echo fallback >{r}/status; return; }}; \
           fi; \
           unset PWD OLDPWD SHLVL; __ak_i=0; \
           while [ -e {r}/env/$__ak_i ]; do \
             __ak_read {r}/env/$__ak_i; export \"$__ak_a\"; __ak_i=$((__ak_i + 1)); \
           done; \
           exec 3<{r}/in 4>{r}/out 5>{r}/err; \
           echo run >{r}/status; \
           {init} \"$@\" <&3 >&4 2>&5 3<&- 4>&- 5>&-; \
           __ak_i=$?; exec 3<&- 4>&- 5>&-; \
           echo $__ak_i >{r}/status; \
         }}; \
         trap 'exit 0' TERM INT HUP; \
         trap __ak_serve USR1; \
         __ak_nap=2; \
         while :; do \
           if [ -d {CONTROL_MOUNT}/claimed ]; then sleep 2 & __ak_idle=$!; wait $__ak_idle; continue; fi; \
           __ak_now=$(date +%s); __ak_d=$(cat {CONTROL_MOUNT}/deadline 2>/dev/null || echo 0); \
           [ \"$__ak_now\" -ge \"$__ak_d\" ] && exit 0; \
           __ak_s=$((__ak_d - __ak_now)); [ \"$__ak_s\" -gt $__ak_nap ] && __ak_s=$__ak_nap; \
           [ $__ak_nap -lt {LONGEST_IDLE_NAP_SECS} ] && __ak_nap=$((__ak_nap * 2)); \
           sleep \"$__ak_s\" & __ak_idle=$!; wait $__ak_idle; \
         done"
    );
    vec!["/bin/sh".into(), "-c".into(), script]
}

/// What differs between a one-shot container and a kept one.
pub struct Shape<'a> {
    pub command: Vec<String>,
    pub labels: HashMap<String, String>,
    /// Attach stdin and keep it open until we close it.
    pub stdin: bool,
    pub tty: bool,
    /// Host directory for the copy-on-write workspace's upper and work dirs.
    pub scratch: Option<&'a Path>,
    /// Kept sandboxes: host control directory mounted read-only at [`CONTROL_MOUNT`].
    pub control_dir: Option<&'a Path>,
    pub auto_remove: bool,
}

/// Whether this engine needs host scratch space for a copy-on-write workspace
/// (Docker does; Podman has overlay binds that keep the upper layer itself).
pub fn needs_scratch(flavor: Flavor, spec: &SandboxSpec) -> bool {
    flavor == Flavor::Docker
        && spec.workspace.is_some()
        && spec.policy.workspace == WorkspaceMode::CopyOnWrite
}

pub fn container_body(
    flavor: Flavor,
    spec: &SandboxSpec,
    shape: Shape<'_>,
) -> Result<ContainerCreateBody> {
    let policy = &spec.policy;
    let mut mounts = Vec::new();
    let mut binds = Vec::new();

    if let Some(ws) = &spec.workspace {
        let host = path_str(&ws.host)?;
        match policy.workspace {
            WorkspaceMode::ReadWrite | WorkspaceMode::ReadOnly => mounts.push(bind(
                host,
                &ws.path_in_sandbox,
                policy.workspace == WorkspaceMode::ReadOnly,
            )),
            // Podman's `:O` bind is an overlay whose upper layer lives and dies with the container.
            WorkspaceMode::CopyOnWrite if flavor == Flavor::Podman => {
                if host.contains(':') {
                    return Err(Error::Conflict(format!(
                        "the copy-on-write workspace cannot use {host}: its path contains `:`; run from another directory or choose --profile permissive or restrictive"
                    )));
                }
                binds.push(format!("{host}:{}:O", ws.path_in_sandbox));
            }
            WorkspaceMode::CopyOnWrite => {
                let scratch = shape
                    .scratch
                    .expect("copy-on-write workspace needs scratch space");
                mounts.push(overlay_volume(host, scratch, &ws.path_in_sandbox)?);
            }
        }
    }
    if let Some(home) = &spec.home {
        let home = path_str(home)?;
        mounts.push(bind(home, home, true));
    }
    for v in &spec.volumes {
        mounts.push(bind(path_str(&v.host)?, &v.container, v.read_only));
    }
    if let Some(ctl) = shape.control_dir {
        mounts.push(bind(path_str(ctl)?, CONTROL_MOUNT, true));
    }

    let (cap_add, mut cap_drop) = match &policy.capabilities {
        Capabilities::EngineDefault => (None, None),
        Capabilities::DefaultWithout(caps) => (None, Some(caps.clone())),
        Capabilities::None => (None, Some(vec!["ALL".to_string()])),
    };
    // netavark turns route_localnet on for its bridge when a port is
    // published on 127.0.0.1, and then a raw packet to 127.0.0.1 would reach
    // the host's loopback services (CVE-2020-8558). Podman's default set has
    // no NET_RAW; make sure a host's containers.conf cannot add it back.
    if flavor == Flavor::Podman && policy.network {
        let drop = cap_drop.get_or_insert_with(Vec::new);
        if !drop.iter().any(|c| c == "ALL" || c == "NET_RAW") {
            drop.push("NET_RAW".to_string());
        }
    }
    let mut security_opt = Vec::new();
    if policy.no_new_privileges {
        security_opt.push("no-new-privileges:true".to_string());
    }
    // Every profile gets our filter (the same table as native's), never the
    // engine's default, which differs per engine and version.
    let profile = crate::seccomp::profile(policy.seccomp == Seccomp::Restrictive).to_string();
    // Docker takes the profile inline; Podman's API takes a path on its host.
    let value = match flavor {
        Flavor::Docker => profile,
        Flavor::Podman => crate::seccomp::profile_file(&profile)?
            .display()
            .to_string(),
    };
    security_opt.push(format!("seccomp={value}"));
    let mut tmpfs: HashMap<String, String> = HashMap::new();
    if policy.read_only_root {
        tmpfs.insert(
            "/tmp".to_string(),
            format!("rw,nosuid,nodev,size={}", policy.tmp_size_bytes),
        );
    }
    tmpfs.extend(crate::secret_files::tmpfs(spec));

    let mut exposed = Vec::new();
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for p in &spec.ports {
        let key = format!("{}/{}", p.container_port, p.protocol.as_str());
        exposed.push(key.clone());
        bindings
            .entry(key)
            .or_insert_with(|| Some(Vec::new()))
            .as_mut()
            .unwrap()
            .push(PortBinding {
                host_ip: Some(p.host_ip.clone()),
                host_port: Some(if p.host_port == 0 {
                    String::new()
                } else {
                    p.host_port.to_string()
                }),
            });
    }

    let limits = policy.limits;
    let host_config = HostConfig {
        init: Some(true),
        auto_remove: Some(shape.auto_remove),
        // agentkernel's own network (`network.rs`), resolved to its ID when
        // the container is created.
        network_mode: Some(
            if policy.network {
                crate::network::NAME
            } else {
                "none"
            }
            .to_string(),
        ),
        readonly_rootfs: Some(policy.read_only_root),
        tmpfs: (!tmpfs.is_empty()).then_some(tmpfs),
        mounts: Some(mounts),
        cap_add,
        cap_drop,
        security_opt: (!security_opt.is_empty()).then_some(security_opt),
        memory: limits.memory_bytes.map(|m| m as i64),
        // No swap beyond the memory limit: a memory hog must meet the OOM killer, not the disk.
        memory_swap: limits.memory_bytes.map(|m| m as i64),
        nano_cpus: limits.cpus.map(|c| (c * 1e9) as i64),
        pids_limit: limits.pids,
        port_bindings: (!bindings.is_empty()).then_some(bindings),
        binds: (!binds.is_empty()).then_some(binds),
        ulimits: (flavor == Flavor::Podman).then(podman_ulimits),
        ..Default::default()
    };

    let env: Vec<String> = spec
        .exec
        .env
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    Ok(ContainerCreateBody {
        image: Some(spec.image.clone()),
        // The command runs exactly as given: an image's entrypoint would
        // re-interpret it (the command passes through byte for byte, as with `docker run`).
        entrypoint: Some(vec![]),
        cmd: Some(shape.command),
        env: (!env.is_empty()).then_some(env),
        working_dir: spec.exec.workdir.clone(),
        labels: Some(shape.labels),
        attach_stdin: Some(shape.stdin),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        open_stdin: Some(shape.stdin),
        stdin_once: Some(shape.stdin),
        tty: Some(shape.tty),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        host_config: Some(host_config),
        ..Default::default()
    })
}

/// Podman asks for 1048576 open files and 32768 processes by default; raising
/// a limit above our own hard limit needs CAP_SYS_RESOURCE, which a root
/// process in a container often lacks (runc then fails with "error setting
/// rlimits"). Asking for no more than we have always works.
fn podman_ulimits() -> Vec<ResourcesUlimits> {
    let limit = |resource, wanted: i64, name: &str| {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass.
        let hard = if unsafe { libc::getrlimit(resource, &mut r) } == 0
            && r.rlim_max != libc::RLIM_INFINITY
        {
            r.rlim_max as i64
        } else {
            wanted
        };
        let value = wanted.min(hard);
        ResourcesUlimits {
            name: Some(name.to_string()),
            soft: Some(value),
            hard: Some(value),
        }
    };
    vec![
        limit(libc::RLIMIT_NOFILE, 1 << 20, "nofile"),
        limit(libc::RLIMIT_NPROC, 32768, "nproc"),
    ]
}

fn bind(source: &str, target: &str, read_only: bool) -> Mount {
    Mount {
        typ: Some(MountType::BIND),
        source: Some(source.to_string()),
        target: Some(target.to_string()),
        read_only: Some(read_only),
        ..Default::default()
    }
}

/// An anonymous volume of the `local` driver that mounts an overlay with the
/// host directory as its read-only lower layer: the sandbox sees and may
/// change the files, the host copy never changes. The volume goes away with
/// the container (`remove -v`), the upper layer with the scratch directory.
fn overlay_volume(lower: &str, scratch: &Path, target: &str) -> Result<Mount> {
    if lower.contains([',', ':']) {
        return Err(Error::Conflict(format!(
            "the copy-on-write workspace cannot use {lower}: its path contains `,` or `:`; run from another directory or choose --profile permissive or restrictive"
        )));
    }
    let upper = scratch.join("upper");
    let work = scratch.join("work");
    for dir in [&upper, &work] {
        std::fs::create_dir_all(dir).map_err(|e| Error::state(dir, e))?;
    }
    let options = HashMap::from([
        ("type".to_string(), "overlay".to_string()),
        ("device".to_string(), "overlay".to_string()),
        (
            "o".to_string(),
            format!(
                "lowerdir={lower},upperdir={},workdir={}",
                path_str(&upper)?,
                path_str(&work)?
            ),
        ),
    ]);
    Ok(Mount {
        typ: Some(MountType::VOLUME),
        target: Some(target.to_string()),
        volume_options: Some(MountVolumeOptions {
            driver_config: Some(MountVolumeOptionsDriverConfig {
                name: Some("local".to_string()),
                options: Some(options),
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().ok_or_else(|| {
        Error::invalid(
            "path",
            p.to_string_lossy(),
            "must be valid UTF-8 for the Docker API",
        )
    })
}
