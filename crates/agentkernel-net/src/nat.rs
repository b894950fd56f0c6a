//! iptables: the one-time NAT/forwarding setup of a bridge, and the
//! mechanics every rule change shares (read with `iptables-save`, change
//! with one atomic `iptables-restore --noflush` batch, under a lock).
//!
//! Rules are found again by their comment tag, never by text comparison with
//! what we would have written, because `iptables-save` normalises rules
//! (adds `/32`, `-m tcp`, reorders matches) differently across versions.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};
use crate::{ports, Lease, NetConfig, PortMapping};

pub const CHAIN_POSTROUTING: &str = "AGENTKERNEL-POSTROUTING";
pub const CHAIN_DNAT: &str = "AGENTKERNEL-DNAT";
pub const CHAIN_FORWARD: &str = "AGENTKERNEL-FORWARD";
/// Serialises our read-modify-write of the ruleset across processes (like
/// iptables' own `/run/xtables.lock`).
const LOCK_PATH: &str = "/run/agentkernel-net.lock";

/// The current ruleset, as `iptables-save` prints it, by table.
pub struct Ruleset {
    tables: Vec<(String, Vec<String>)>,
}

impl Ruleset {
    pub fn lines(&self, table: &str) -> &[String] {
        self.tables
            .iter()
            .find(|(t, _)| t == table)
            .map_or(&[], |(_, l)| l.as_slice())
    }

    fn has_chain(&self, table: &str, chain: &str) -> bool {
        let decl = format!(":{chain} ");
        self.lines(table).iter().any(|l| l.starts_with(&decl))
    }

    /// Whether `from` already jumps to `to`.
    fn has_jump(&self, table: &str, from: &str, to: &str) -> bool {
        let head = format!("-A {from} ");
        let tail = format!("-j {to}");
        self.lines(table)
            .iter()
            .any(|l| l.starts_with(&head) && l.ends_with(&tail))
    }

    fn has_tag(&self, table: &str, tag: &str) -> bool {
        self.lines(table)
            .iter()
            .any(|l| comment(l).as_deref() == Some(tag))
    }

    /// Rules (as `-A ...` lines) of `table` whose tag satisfies `pred`.
    fn tagged(&self, table: &str, pred: impl Fn(&str) -> bool) -> Vec<String> {
        self.lines(table)
            .iter()
            .filter(|l| comment(l).is_some_and(|c| pred(&c)))
            .cloned()
            .collect()
    }
}

/// The `--comment` of a saved rule, quoted or not.
pub fn comment(line: &str) -> Option<String> {
    let rest = &line[line.find("--comment ")? + "--comment ".len()..];
    if let Some(q) = rest.strip_prefix('"') {
        Some(q[..q.find('"')?].to_string())
    } else {
        Some(rest.split(' ').next()?.to_string())
    }
}

/// Changes to apply in one `iptables-restore` transaction.
#[derive(Default)]
pub struct Batch {
    nat: Vec<String>,
    filter: Vec<String>,
}

impl Batch {
    pub fn nat(&mut self, line: String) {
        self.nat.push(line);
    }

    fn filter(&mut self, line: String) {
        self.filter.push(line);
    }

    fn is_empty(&self) -> bool {
        self.nat.is_empty() && self.filter.is_empty()
    }

    fn render(&self) -> String {
        let mut s = String::new();
        for (table, lines) in [("nat", &self.nat), ("filter", &self.filter)] {
            if lines.is_empty() {
                continue;
            }
            s.push_str(&format!("*{table}\n"));
            // Chain declarations must precede the rules that use them.
            for l in lines.iter().filter(|l| l.starts_with(':')) {
                s.push_str(l);
                s.push('\n');
            }
            for l in lines.iter().filter(|l| !l.starts_with(':')) {
                s.push_str(l);
                s.push('\n');
            }
            s.push_str("COMMIT\n");
        }
        s
    }
}

/// Holds the lock file's `flock` until dropped.
struct Lock(#[allow(dead_code)] File);

fn lock() -> Result<Lock> {
    let f = File::options()
        .create(true)
        .append(true)
        .open(LOCK_PATH)
        .map_err(|e| Error::state("open", LOCK_PATH, e))?;
    loop {
        // SAFETY: flock on a descriptor we own for the call's duration.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(Lock(f));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(Error::state("lock", LOCK_PATH, e));
        }
    }
}

fn save() -> Result<Ruleset> {
    let out = Command::new("iptables-save")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Iptables {
            command: "iptables-save".into(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(Error::Iptables {
            command: "iptables-save".into(),
            detail: one_line(&out.stderr, out.status),
        });
    }
    let mut tables: Vec<(String, Vec<String>)> = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(t) = line.strip_prefix('*') {
            tables.push((t.to_string(), Vec::new()));
        } else if line.starts_with(':') || line.starts_with("-A ") {
            if let Some((_, l)) = tables.last_mut() {
                l.push(line.to_string());
            }
        }
    }
    Ok(Ruleset { tables })
}

fn restore(batch: &Batch) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let input = batch.render();
    let err = |detail: String| Error::Iptables {
        command: "iptables-restore --noflush".into(),
        detail,
    };
    let mut child = Command::new("iptables-restore")
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    let wrote = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes());
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(one_line(&out.stderr, out.status)));
    }
    wrote.map_err(|e| err(e.to_string()))
}

fn one_line(stderr: &[u8], status: std::process::ExitStatus) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.is_empty() {
        format!("exit status {status}")
    } else {
        text
    }
}

fn setup_tag(cfg: &NetConfig, what: &str) -> String {
    format!("ak:{}:{what}", cfg.bridge)
}

/// The tag of one lease's port rules: address and sandbox id, so a rule is
/// never mistaken for that of a later holder of the same address.
pub fn lease_tag(lease: &Lease) -> String {
    format!("ak:{}:{}:{}", lease.bridge, lease.ip, lease.sandbox_id)
}

/// Adds whatever of the bridge's persistent setup is missing and publishes
/// the lease's ports, in one transaction. Returns the ports with host port 0
/// replaced by the one chosen.
pub fn setup_and_publish(cfg: &NetConfig, lease: &Lease) -> Result<Vec<PortMapping>> {
    // The common case — no ports, setup already done since boot — needs no
    // iptables at all: reading the ruleset costs milliseconds per sandbox.
    if lease.ports.is_empty() && setup_marker_is_current(cfg) {
        return Ok(Vec::new());
    }
    let _lock = lock()?;
    let rs = save()?;
    let mut b = Batch::default();
    setup(cfg, &rs, &mut b);
    let ports = ports::publish(lease, &rs, &mut b)?;
    restore(&b)?;
    let _ = std::fs::write(setup_marker(cfg), boot_id());
    Ok(ports)
}

/// Written after the bridge's rules were verified; on tmpfs (`/run`), and
/// tagged with the boot id, so a reboot always re-checks. A later firewall
/// flush is repaired by the next run that publishes a port, or after removing
/// this file.
fn setup_marker(cfg: &NetConfig) -> std::path::PathBuf {
    std::path::PathBuf::from(format!(
        "/run/agentkernel-net.{}.{}.ready",
        cfg.bridge,
        cfg.subnet.to_string().replace('/', "_")
    ))
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default()
}

fn setup_marker_is_current(cfg: &NetConfig) -> bool {
    let id = boot_id();
    !id.is_empty() && std::fs::read_to_string(setup_marker(cfg)).is_ok_and(|m| m == id)
}

/// The bridge's persistent rules (see the crate docs), each added only if
/// its tag is absent.
fn setup(cfg: &NetConfig, rs: &Ruleset, b: &mut Batch) {
    let (br, net) = (&cfg.bridge, cfg.subnet);
    // nat: our two chains, jumped to once each.
    for chain in [CHAIN_POSTROUTING, CHAIN_DNAT] {
        if !rs.has_chain("nat", chain) {
            b.nat(format!(":{chain} - [0:0]"));
        }
    }
    if !rs.has_jump("nat", "POSTROUTING", CHAIN_POSTROUTING) {
        b.nat(format!("-A POSTROUTING -j {CHAIN_POSTROUTING}"));
    }
    // Packets to any local address (127.0.0.1 included: the OUTPUT hook sees
    // the host's own connections) are candidates for a published port.
    for hook in ["PREROUTING", "OUTPUT"] {
        if !rs.has_jump("nat", hook, CHAIN_DNAT) {
            b.nat(format!(
                "-A {hook} -m addrtype --dst-type LOCAL -j {CHAIN_DNAT}"
            ));
        }
    }
    let nat_rules = [
        // Sandbox traffic leaving the host takes the host's address.
        ("masq", format!("-s {net} ! -o {br}")),
        // A DNATed 127.0.0.1 connection must not reach the sandbox with a
        // loopback source it cannot answer: give it the gateway's.
        ("localnet", format!("-s 127.0.0.0/8 -o {br}")),
        // A sandbox reaching a published port of the host (hairpin) must see
        // replies come back through the host, so masquerade it too.
        (
            "hairpin",
            format!("-s {net} -o {br} -m conntrack --ctstate DNAT"),
        ),
    ];
    for (what, spec) in nat_rules {
        let tag = setup_tag(cfg, what);
        if !rs.has_tag("nat", &tag) {
            b.nat(format!(
                "-A {CHAIN_POSTROUTING} {spec} -m comment --comment \"{tag}\" -j MASQUERADE"
            ));
        }
    }

    // filter: accept the bridge's traffic in FORWARD ahead of anything that
    // would drop it (Docker sets the FORWARD policy to DROP).
    if !rs.has_chain("filter", CHAIN_FORWARD) {
        b.filter(format!(":{CHAIN_FORWARD} - [0:0]"));
    }
    if !rs.has_jump("filter", "FORWARD", CHAIN_FORWARD) {
        b.filter(format!("-I FORWARD 1 -j {CHAIN_FORWARD}"));
    }
    let fwd_rules = [
        ("out", format!("-i {br}")),
        (
            "in",
            format!("-o {br} -m conntrack --ctstate RELATED,ESTABLISHED,DNAT"),
        ),
    ];
    for (what, spec) in fwd_rules {
        let tag = setup_tag(cfg, what);
        if !rs.has_tag("filter", &tag) {
            b.filter(format!(
                "-A {CHAIN_FORWARD} {spec} -m comment --comment \"{tag}\" -j ACCEPT"
            ));
        }
    }
}

/// Removes the lease's port rules (by tag); none left is fine.
pub fn unpublish(lease: &Lease) -> Result<()> {
    let tag = lease_tag(lease);
    let _lock = lock()?;
    let rs = save()?;
    let mut b = Batch::default();
    for line in rs.tagged("nat", |c| c == tag) {
        b.nat(delete_line(&line));
    }
    restore(&b)
}

/// Removes every rule tagged for the bridge, and our chains with their
/// jumps once no rule is left in them.
pub fn teardown(cfg: &NetConfig) -> Result<()> {
    let _ = std::fs::remove_file(setup_marker(cfg));
    let prefix = format!("ak:{}:", cfg.bridge);
    let _lock = lock()?;
    let rs = save()?;
    let mut b = Batch::default();
    for (table, chains, hooks) in [
        (
            "nat",
            &[CHAIN_POSTROUTING, CHAIN_DNAT][..],
            &[
                ("POSTROUTING", CHAIN_POSTROUTING),
                ("PREROUTING", CHAIN_DNAT),
                ("OUTPUT", CHAIN_DNAT),
            ][..],
        ),
        (
            "filter",
            &[CHAIN_FORWARD][..],
            &[("FORWARD", CHAIN_FORWARD)][..],
        ),
    ] {
        let ours = rs.tagged(table, |c| c.starts_with(&prefix));
        let mut lines: Vec<String> = ours.iter().map(|l| delete_line(l)).collect();
        for chain in chains {
            let head = format!("-A {chain} ");
            let left = rs
                .lines(table)
                .iter()
                .filter(|l| l.starts_with(&head) && !ours.contains(l))
                .count();
            if left > 0 || !rs.has_chain(table, chain) {
                continue;
            }
            let tail = format!("-j {chain}");
            for (hook, target) in hooks {
                if target == chain {
                    let jump = format!("-A {hook} ");
                    lines.extend(
                        rs.lines(table)
                            .iter()
                            .filter(|l| l.starts_with(&jump) && l.ends_with(&tail))
                            .map(|l| delete_line(l)),
                    );
                }
            }
            // After the jump deletions above (render keeps line order).
            lines.push(format!("-X {chain}"));
        }
        for l in lines {
            match table {
                "nat" => b.nat(l),
                _ => b.filter(l),
            }
        }
    }
    restore(&b)
}

fn delete_line(saved: &str) -> String {
    format!("-D {}", saved.strip_prefix("-A ").unwrap_or(saved))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_quoted_or_not() {
        assert_eq!(
            comment("-A X -m comment --comment \"ak:b:1.2.3.4:id\" -j DNAT").as_deref(),
            Some("ak:b:1.2.3.4:id")
        );
        assert_eq!(
            comment("-A X -m comment --comment plain -j RETURN").as_deref(),
            Some("plain")
        );
        assert_eq!(comment("-A X -j RETURN"), None);
    }

    #[test]
    fn batch_declares_chains_first() {
        let mut b = Batch::default();
        b.nat("-A FOO -j RETURN".into());
        b.nat(":FOO - [0:0]".into());
        assert_eq!(b.render(), "*nat\n:FOO - [0:0]\n-A FOO -j RETURN\nCOMMIT\n");
    }
}
