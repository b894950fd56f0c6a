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
use crate::{ports, Lease, NetConfig};

pub const CHAIN_POSTROUTING: &str = "AGENTKERNEL-POSTROUTING";
pub const CHAIN_DNAT: &str = "AGENTKERNEL-DNAT";
pub const CHAIN_FORWARD: &str = "AGENTKERNEL-FORWARD";
pub const CHAIN_INPUT: &str = "AGENTKERNEL-INPUT";
/// Host loopback: never a destination for a packet from a sandbox.
const LOOPBACK_NET: &str = "127.0.0.0/8";
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
    raw: Vec<String>,
    nat: Vec<String>,
    filter: Vec<String>,
}

impl Batch {
    fn raw(&mut self, line: String) {
        self.raw.push(line);
    }

    fn table(&mut self, table: &str, line: String) {
        match table {
            "raw" => self.raw(line),
            "nat" => self.nat(line),
            _ => self.filter(line),
        }
    }

    pub fn nat(&mut self, line: String) {
        self.nat.push(line);
    }

    pub fn filter(&mut self, line: String) {
        self.filter.push(line);
    }

    fn is_empty(&self) -> bool {
        self.raw.is_empty() && self.nat.is_empty() && self.filter.is_empty()
    }

    fn render(&self) -> String {
        let mut s = String::new();
        for (table, lines) in [
            ("raw", &self.raw),
            ("nat", &self.nat),
            ("filter", &self.filter),
        ] {
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
/// replaced by the one chosen, and their sockets.
pub fn setup_and_publish(cfg: &NetConfig, lease: &Lease) -> Result<Vec<ports::Published>> {
    // The common case — no ports, setup already done since boot — needs no
    // iptables at all: reading the ruleset costs milliseconds per sandbox.
    if lease.ports.is_empty() && setup_marker_is_current(cfg) {
        return Ok(Vec::new());
    }
    let _lock = lock()?;
    let rs = save()?;
    let mut b = Batch::default();
    setup(cfg, &rs, &mut b);
    let others = if lease.ports.is_empty() {
        Vec::new()
    } else {
        crate::lease::list(cfg)?
    };
    let ports = ports::publish(lease, &rs, &others, &mut b)?;
    restore(&b)?;
    let _ = std::fs::write(setup_marker(cfg), boot_id());
    Ok(ports)
}

/// Raised whenever [`setup`] gains a rule.
const SETUP_VERSION: u32 = 2;

/// Written after the bridge's rules were verified; on tmpfs (`/run`), and
/// tagged with the boot id, so a reboot always re-checks. A later firewall
/// flush is repaired by the next run that publishes a port, or after removing
/// this file.
/// The name carries [`SETUP_VERSION`], so a host set up by an earlier
/// version (whose rules lack later additions) is checked again.
fn setup_marker(cfg: &NetConfig) -> std::path::PathBuf {
    std::path::PathBuf::from(format!(
        "/run/agentkernel-net.{}.{}.v{SETUP_VERSION}.ready",
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
    let tagged_rule = |b: &mut Batch, table: &str, op: &str, what: &str, rule: String| {
        let tag = setup_tag(cfg, what);
        if !rs.has_tag(table, &tag) {
            let (spec, target) = rule.split_once(" -j ").expect("a rule has a target");
            b.table(
                table,
                format!("{op} {spec} -m comment --comment \"{tag}\" -j {target}"),
            );
        }
    };

    // raw: a packet from a sandbox addressed to the host's loopback is
    // dropped before routing or conntrack see it. The kernel drops it too
    // (a martian, since the bridge has route_localnet=0); this rule keeps
    // that true whatever a later sysctl says (CVE-2020-8558).
    tagged_rule(
        b,
        "raw",
        "-A",
        "no-loopback",
        format!("PREROUTING -i {br} -d {LOOPBACK_NET} -j DROP"),
    );

    // nat: our two chains, jumped to once each.
    for chain in [CHAIN_POSTROUTING, CHAIN_DNAT] {
        if !rs.has_chain("nat", chain) {
            b.nat(format!(":{chain} - [0:0]"));
        }
    }
    if !rs.has_jump("nat", "POSTROUTING", CHAIN_POSTROUTING) {
        b.nat(format!("-A POSTROUTING -j {CHAIN_POSTROUTING}"));
    }
    // Packets to the host's non-loopback addresses are candidates for a
    // published port. Loopback ones are not: a DNATed packet from 127.0.0.1
    // could only be routed to the bridge with route_localnet, so the port's
    // own listening socket takes them (`forward`).
    for hook in ["PREROUTING", "OUTPUT"] {
        if !rs.has_jump("nat", hook, CHAIN_DNAT) {
            b.nat(format!(
                "-A {hook} -m addrtype --dst-type LOCAL -j {CHAIN_DNAT}"
            ));
        }
    }
    // Not from sandboxes either: they reach published ports through the
    // relay, because the bridge would drop a DNATed packet between two of
    // its isolated ports (with br_netfilter it is bridged, not routed).
    for (what, spec) in [
        ("dnat-no-loopback", format!("-d {LOOPBACK_NET}")),
        ("dnat-not-sandboxes", format!("-i {br}")),
    ] {
        tagged_rule(
            b,
            "nat",
            "-I",
            what,
            format!("{CHAIN_DNAT} 1 {spec} -j RETURN"),
        );
    }
    // Sandbox traffic leaving the host takes the host's address.
    tagged_rule(
        b,
        "nat",
        "-A",
        "masq",
        format!("{CHAIN_POSTROUTING} -s {net} ! -o {br} -j MASQUERADE"),
    );
    // Rules of earlier versions that no longer apply.
    for what in ["localnet", "hairpin"] {
        for line in rs.tagged("nat", |c| c == setup_tag(cfg, what)) {
            b.nat(delete_line(&line));
        }
    }

    // filter: accept the bridge's traffic in FORWARD ahead of anything that
    // would drop it (Docker sets the FORWARD policy to DROP), except from one
    // sandbox to another. The bridge isolates its ports at layer 2
    // (veth.rs); this stops the same packet sent to the gateway's MAC and
    // routed back into the bridge.
    for (chain, hook) in [(CHAIN_FORWARD, "FORWARD"), (CHAIN_INPUT, "INPUT")] {
        if !rs.has_chain("filter", chain) {
            b.filter(format!(":{chain} - [0:0]"));
        }
        if !rs.has_jump("filter", hook, chain) {
            b.filter(format!("-I {hook} 1 -j {chain}"));
        }
    }
    tagged_rule(
        b,
        "filter",
        "-I",
        "isolate",
        format!("{CHAIN_FORWARD} 1 -i {br} -o {br} -j REJECT --reject-with icmp-port-unreachable"),
    );
    tagged_rule(
        b,
        "filter",
        "-A",
        "out",
        format!("{CHAIN_FORWARD} -i {br} -j ACCEPT"),
    );
    tagged_rule(
        b,
        "filter",
        "-A",
        "in",
        format!(
            "{CHAIN_FORWARD} -o {br} -m conntrack --ctstate RELATED,ESTABLISHED,DNAT -j ACCEPT"
        ),
    );
    // The host itself, from a sandbox: replies to the host's own connections
    // (a published port's relay), ping, DNS in case the host's resolver
    // listens on one of its addresses (resolv.rs passes the host's
    // non-loopback nameservers on), and published ports (each lease inserts
    // its own rule). Nothing else: services the host binds to its own
    // addresses are for the host and its network, not its sandboxes.
    let input = [
        (
            "in-replies",
            "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        ),
        ("in-ping", "-p icmp -m icmp --icmp-type 8 -j ACCEPT"),
        ("in-dns-udp", "-p udp -m udp --dport 53 -j ACCEPT"),
        ("in-dns-tcp", "-p tcp -m tcp --dport 53 -j ACCEPT"),
        ("in-deny", "-j REJECT --reject-with icmp-port-unreachable"),
    ];
    for (what, spec) in input {
        tagged_rule(
            b,
            "filter",
            "-A",
            what,
            format!("{CHAIN_INPUT} -i {br} {spec}"),
        );
    }
}

/// Removes the lease's port rules (by tag); none left is fine.
pub fn unpublish(lease: &Lease) -> Result<()> {
    let tag = lease_tag(lease);
    let _lock = lock()?;
    let rs = save()?;
    let mut b = Batch::default();
    for table in ["nat", "filter"] {
        for line in rs.tagged(table, |c| c == tag) {
            b.table(table, delete_line(&line));
        }
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
        ("raw", &[][..], &[][..]),
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
            &[CHAIN_FORWARD, CHAIN_INPUT][..],
            &[("FORWARD", CHAIN_FORWARD), ("INPUT", CHAIN_INPUT)][..],
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
            b.table(table, l);
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
