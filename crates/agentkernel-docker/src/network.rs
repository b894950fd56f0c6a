//! agentkernel's own engine network, which every sandbox with a network
//! joins instead of the engine's default bridge.
//!
//! - **Docker**: a bridge with inter-container traffic off
//!   (`com.docker.network.bridge.enable_icc=false`: Docker drops forwarding
//!   from the bridge back into it), so sandboxes reach each other only
//!   through published ports, and no container of anyone else shares it.
//!   Its subnet is fixed ([`DOCKER_SUBNET`]): Docker (before API 1.44) does not
//!   refuse a second network of the same name, but its address allocator
//!   refuses a second pool overlapping the first, atomically. So when many
//!   runs create it at once exactly one succeeds, and the others find it.
//! - **Podman** refuses duplicate names itself. netavark cannot stop
//!   traffic between two containers of one network (`isolate` only keeps
//!   other networks' containers out), so agentkernel adds what Docker's
//!   `enable_icc=false` is: an iptables rule (mangle `FORWARD`) dropping
//!   what is forwarded from the network's subnet to itself (bridged frames pass iptables with
//!   `br_netfilter`, which Docker and agentkernel turn on). Rootful only: a
//!   rootless engine's bridge lives in its own network namespace.
//!
//! Containers name the network by ID (resolved once per container created),
//! so a network recreated under the same name never confuses the engine.

use std::collections::HashMap;

use agentkernel_core::Error;
use bollard::models::{Ipam, IpamConfig, NetworkCreateRequest};

use crate::engine::{is_not_found, message_of, Flavor};
use crate::Engine;

/// The network's name, in `docker network ls`.
pub const NAME: &str = "agentkernel";
/// Docker only: the bridge interface's name (the native backend's is
/// `agentkernel0`).
pub const DOCKER_BRIDGE: &str = "ak-docker0";
/// Docker only: the network's subnet (the native backend's is
/// 10.209.0.0/16).
pub const DOCKER_SUBNET: &str = "10.208.0.0/16";
/// How long a run that lost the race to create the network waits for the
/// winner's to appear: 40 × 50 ms.
const VISIBLE_TRIES: u32 = 40;
const VISIBLE_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// Returns the network's ID, creating it first if it does not exist.
/// Safe when many processes call it at once. Refuses a Docker bridge that
/// routes loopback addresses (see [`refuse_route_localnet`]).
pub async fn ensure(engine: &Engine) -> Result<String, Error> {
    let id = ensure_exists(engine).await?;
    if engine.flavor == Flavor::Podman && is_root() {
        isolate_podman_bridge(engine, &id).await?;
    }
    if engine.flavor == Flavor::Docker {
        let key = format!("/proc/sys/net/ipv4/conf/{DOCKER_BRIDGE}/route_localnet");
        refuse_route_localnet(std::fs::read_to_string(key).ok().as_deref())
            .map_err(|why| engine.failure(why))?;
    }
    Ok(id)
}

/// dockerd with `"userland-proxy": false` sets `route_localnet=1` on its
/// bridges, and then a container with CAP_NET_RAW can reach services bound
/// to the host's 127.0.0.1 (CVE-2020-8558). Fail closed. (`value` is the
/// sysctl as read on this machine; none when the engine is remote.)
fn refuse_route_localnet(value: Option<&str>) -> Result<(), String> {
    if value.is_some_and(|v| v.trim() != "0") {
        return Err(format!(
            "the bridge {DOCKER_BRIDGE} of agentkernel's network routes 127.0.0.0/8 \
             (net.ipv4.conf.{DOCKER_BRIDGE}.route_localnet=1, set by dockerd's \
             \"userland-proxy\": false), so sandboxes could reach the host's loopback \
             services; set \"userland-proxy\": true in /etc/docker/daemon.json and \
             restart dockerd, or run with --no-network"
        ));
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The comment that tags agentkernel's rule in `FORWARD`.
const PODMAN_ISOLATION_TAG: &str = "agentkernel-podman-isolation";

/// Makes sure forwarding within the Podman network's subnet is dropped.
/// Checked once per boot and subnet (a marker under /run, as the native
/// bridge's set-up is): each check costs two iptables processes.
async fn isolate_podman_bridge(engine: &Engine, id: &str) -> Result<(), Error> {
    let fail = |why: String| {
        engine.failure(format!(
            "cannot keep Podman sandboxes apart ({why}); run with --no-network, or use -B native or -B docker"
        ))
    };
    let network = engine
        .docker
        .inspect_network(id, None)
        .await
        .map_err(|e| engine.error("inspecting agentkernel's network", e))?;
    // By subnet, not bridge name: netavark creates the bridge only when a
    // container starts, and names it itself (podman0, podman1…).
    let subnet = network
        .ipam
        .and_then(|i| i.config)
        .unwrap_or_default()
        .into_iter()
        .find_map(|c| c.subnet.filter(|s| s.contains('.')))
        .ok_or_else(|| fail("the network has no IPv4 subnet".into()))?;
    let marker = std::path::PathBuf::from(format!(
        "/run/agentkernel/podman-isolated.{}",
        subnet.replace('/', "_")
    ));
    let boot = agentkernel_core::state::boot_id();
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == boot) {
        return Ok(());
    }
    tokio::task::spawn_blocking(move || {
        bridged_frames_through_iptables()?;
        let rule = |op: &str| {
            std::process::Command::new("iptables")
                // In mangle, which bridged frames meet before filter's
                // FORWARD: netavark (re)inserts its ACCEPTing jump at the top
                // of filter's FORWARD and would otherwise come first.
                .args(["-w", "-t", "mangle", op, "FORWARD"])
                .args(["-s", &subnet, "-d", &subnet])
                .args(["-m", "comment", "--comment", PODMAN_ISOLATION_TAG])
                .args(["-j", "DROP"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .output()
        };
        let present = rule("-C").map_err(|e| format!("cannot run iptables: {e}"))?;
        if !present.status.success() {
            let inserted = rule("-I").map_err(|e| format!("cannot run iptables: {e}"))?;
            if !inserted.status.success() {
                return Err(format!(
                    "iptables -t mangle -I FORWARD: {}",
                    String::from_utf8_lossy(&inserted.stderr).trim()
                ));
            }
        }
        let _ = std::fs::create_dir_all("/run/agentkernel");
        let _ = std::fs::write(&marker, boot);
        Ok(())
    })
    .await
    .map_err(|e| fail(e.to_string()))?
    .map_err(fail)
}

/// Bridged IPv4 frames pass iptables only with `br_netfilter` loaded and
/// `bridge-nf-call-iptables=1` (dockerd sets both when it starts).
fn bridged_frames_through_iptables() -> Result<(), String> {
    let key = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    if std::fs::metadata(key).is_err() {
        let _ = std::process::Command::new("modprobe")
            .arg("br_netfilter")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    match std::fs::read_to_string(key) {
        Ok(v) if v.trim() == "1" => Ok(()),
        Ok(_) => std::fs::write(key, "1").map_err(|e| format!("set {key}: {e}")),
        Err(_) => Err("the br_netfilter module is not available (`modprobe br_netfilter`)".into()),
    }
}

async fn ensure_exists(engine: &Engine) -> Result<String, Error> {
    if let Some(id) = find(engine).await? {
        return Ok(id);
    }
    let created = engine.docker.create_network(request(engine.flavor)).await;
    match created {
        Ok(r) if !r.id.is_empty() => return Ok(r.id),
        Ok(_) => {}
        // Another run created it meanwhile (Docker: "Pool overlaps";
        // Podman: "already used"): the look-up below finds theirs.
        Err(_) => {}
    }
    // The winner's network becomes visible by name a moment after its
    // address pool is taken (which is what failed us): give it that moment.
    for _ in 0..VISIBLE_TRIES {
        if let Some(id) = find(engine).await? {
            return Ok(id);
        }
        tokio::time::sleep(VISIBLE_WAIT).await;
    }
    let why = match created {
        Err(e) => message_of(&e),
        Ok(_) => "the engine returned no network ID".into(),
    };
    Err(engine.failure(format!(
        "cannot create agentkernel's network {NAME:?} ({why}); if another network uses {DOCKER_SUBNET}, remove it, or run with --no-network"
    )))
}

async fn find(engine: &Engine) -> Result<Option<String>, Error> {
    match engine.docker.inspect_network(NAME, None).await {
        Ok(n) => Ok(n.id),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(engine.error("inspecting agentkernel's network", e)),
    }
}

fn request(flavor: Flavor) -> NetworkCreateRequest {
    let labels = HashMap::from([(crate::labels::MANAGED.to_string(), "true".to_string())]);
    let (options, ipam) = match flavor {
        Flavor::Docker => (
            HashMap::from([
                (
                    "com.docker.network.bridge.enable_icc".to_string(),
                    "false".to_string(),
                ),
                (
                    "com.docker.network.bridge.name".to_string(),
                    DOCKER_BRIDGE.to_string(),
                ),
            ]),
            Some(Ipam {
                config: Some(vec![IpamConfig {
                    subnet: Some(DOCKER_SUBNET.to_string()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        ),
        Flavor::Podman => (
            HashMap::from([("isolate".to_string(), "true".to_string())]),
            None,
        ),
    };
    NetworkCreateRequest {
        name: NAME.to_string(),
        driver: Some("bridge".to_string()),
        options: Some(options),
        labels: Some(labels),
        ipam,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bridge_routing_loopback_is_refused() {
        assert!(refuse_route_localnet(None).is_ok());
        assert!(refuse_route_localnet(Some("0\n")).is_ok());
        let why = refuse_route_localnet(Some("1\n")).unwrap_err();
        assert!(
            why.contains("userland-proxy") && !why.contains('\n'),
            "{why}"
        );
    }
}
