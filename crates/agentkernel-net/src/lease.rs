//! Address leases: one file per leased address, `STATE/net/leases/<ip>`,
//! holding the whole [`Lease`] as `key=value` lines.
//!
//! A lease file appears complete or not at all: it is written under a
//! temporary name and `link(2)`ed to the address's name. `link` fails with
//! `EEXIST` when the name is taken, which makes it the allocation lock too:
//! no two processes can hold one address, and nobody reads a partial lease.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write as _};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use crate::{veth, NetConfig, PortMapping};

const MAGIC: &str = "agentkernel-net lease v1";
/// Temporary files older than this belong to a dead process.
const STALE_TMP: Duration = Duration::from_secs(60);

/// One sandbox's hold on the network: its address, its host veth and its
/// published ports. [`Lease::to_text`]/[`Lease::parse`] round-trip it, so any
/// process can [`crate::release`] it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub sandbox_id: String,
    /// The sandbox's `eth0` address.
    pub ip: Ipv4Addr,
    /// The subnet's prefix length (`eth0` has `ip/prefix`).
    pub prefix: u8,
    /// The bridge's address, the sandbox's default route.
    pub gateway: Ipv4Addr,
    pub bridge: String,
    /// The host side of the veth pair (the sandbox side is `eth0`).
    pub host_veth: String,
    /// Published ports, with host ports as actually bound (never 0 once
    /// [`crate::attach`] returned).
    pub ports: Vec<PortMapping>,
}

impl Lease {
    /// The small text form stored in the lease file.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{MAGIC}");
        let _ = writeln!(s, "sandbox={}", self.sandbox_id);
        let _ = writeln!(s, "ip={}/{}", self.ip, self.prefix);
        let _ = writeln!(s, "gateway={}", self.gateway);
        let _ = writeln!(s, "bridge={}", self.bridge);
        let _ = writeln!(s, "veth={}", self.host_veth);
        for p in &self.ports {
            let _ = writeln!(
                s,
                "port={} {}:{} {}",
                p.protocol, p.host_ip, p.host_port, p.container_port
            );
        }
        s
    }

    /// Parses [`Lease::to_text`]'s output.
    pub fn parse(text: &str) -> Result<Lease> {
        parse(text).map_err(|reason| Error::Invalid(format!("lease: {reason}")))
    }

    /// Reads a lease file.
    pub fn load(path: &Path) -> Result<Lease> {
        let text = fs::read_to_string(path).map_err(|e| Error::state("read", path, e))?;
        parse(&text).map_err(|reason| Error::BadLease {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Where this lease's file lives.
    pub fn file(&self, cfg: &NetConfig) -> PathBuf {
        dir(cfg).join(self.ip.to_string())
    }
}

fn parse(text: &str) -> std::result::Result<Lease, String> {
    let mut lines = text.lines();
    if lines.next() != Some(MAGIC) {
        return Err(format!("first line is not {MAGIC:?}"));
    }
    let (mut id, mut ip, mut gw, mut br, mut veth) = (None, None, None, None, None);
    let mut ports = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("line {line:?} is not key=value"))?;
        match k {
            "sandbox" => id = Some(v.to_string()),
            "ip" => {
                let (a, p) = v.split_once('/').ok_or("ip without /prefix")?;
                let a: Ipv4Addr = a.parse().map_err(|_| format!("bad ip {v:?}"))?;
                let p: u8 = p.parse().map_err(|_| format!("bad prefix {v:?}"))?;
                ip = Some((a, p));
            }
            "gateway" => gw = Some(v.parse().map_err(|_| format!("bad gateway {v:?}"))?),
            "bridge" => br = Some(v.to_string()),
            "veth" => veth = Some(v.to_string()),
            "port" => ports.push(parse_port(v).ok_or_else(|| format!("bad port {v:?}"))?),
            _ => return Err(format!("unknown key {k:?}")),
        }
    }
    let (ip, prefix) = ip.ok_or("no ip")?;
    Ok(Lease {
        sandbox_id: id.ok_or("no sandbox")?,
        ip,
        prefix,
        gateway: gw.ok_or("no gateway")?,
        bridge: br.ok_or("no bridge")?,
        host_veth: veth.ok_or("no veth")?,
        ports,
    })
}

/// `tcp 127.0.0.1:8080 80`
fn parse_port(v: &str) -> Option<PortMapping> {
    let mut it = v.split(' ');
    let protocol = it.next()?.parse().ok()?;
    let (ip, hp) = it.next()?.rsplit_once(':')?;
    let container_port = it.next()?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some(PortMapping {
        host_ip: ip.parse().ok()?,
        host_port: hp.parse().ok()?,
        container_port,
        protocol,
    })
}

/// Sandbox ids go into file contents, interface-name hashes and iptables
/// comments: keep them to a safe alphabet.
pub(crate) fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "sandbox id {id:?}: use 1 to 128 letters, digits, '-', '_' or '.'"
        )))
    }
}

fn dir(cfg: &NetConfig) -> PathBuf {
    cfg.state_dir.join("net").join("leases")
}

fn cursor_path(cfg: &NetConfig) -> PathBuf {
    cfg.state_dir
        .join("net")
        .join(format!("next-{}", cfg.bridge))
}

/// A name no other thread or process uses for its temporary lease file.
fn tmp_path(dir: &Path) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".tmp-{}-{n}", std::process::id()))
}

/// Leases a free address for `sandbox_id` and writes its lease file. `tap`:
/// the host side is a VM's tap (named so, [`crate::tap::host_name`]), not a veth.
pub(crate) fn allocate(
    cfg: &NetConfig,
    sandbox_id: &str,
    ports: &[PortMapping],
    tap: bool,
) -> Result<Lease> {
    let dir = dir(cfg);
    make_private(&cfg.state_dir, &dir)?;
    let net = cfg.subnet;
    let first = u32::from(net.gateway()) + 1;
    let last = u32::from(net.broadcast()) - 1;
    let count = last - first + 1;
    // Continue after the last address handed out; an unreadable hint just
    // means starting at the beginning.
    let start = read_cursor(cfg)
        .map(u32::from)
        .filter(|&a| (first..=last).contains(&a))
        .map_or(0, |a| a - first);

    let tmp = tmp_path(&dir);
    let result = (|| {
        for i in 0..count {
            let offset = (start + i) % count;
            let ip = Ipv4Addr::from(first + offset);
            let lease = Lease {
                sandbox_id: sandbox_id.to_string(),
                ip,
                prefix: net.prefix,
                gateway: net.gateway(),
                bridge: cfg.bridge.clone(),
                host_veth: if tap {
                    crate::tap::host_name(&cfg.bridge, sandbox_id, offset + 2)
                } else {
                    veth::host_name(&cfg.bridge, sandbox_id, offset + 2)
                },
                ports: ports.to_vec(),
            };
            write_file(&tmp, &lease.to_text())?;
            let path = lease.file(cfg);
            match fs::hard_link(&tmp, &path) {
                Ok(()) => {
                    let next = Ipv4Addr::from(first + (offset + 1) % count);
                    // Only a hint: losing it to a crash or a race is harmless.
                    write_cursor(cfg, next);
                    return Ok(lease);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::state("create lease", &path, e)),
            }
        }
        Err(Error::SubnetExhausted {
            subnet: net.to_string(),
            dir: dir.clone(),
        })
    })();
    let _ = fs::remove_file(&tmp);
    result
}

/// Creates the lease directory and its parents up to the state directory
/// 0700 (leases name sandboxes and their published ports: nobody else's
/// business), and closes a state directory an older version left 0755.
/// One `stat` when all is in place.
fn make_private(state_dir: &Path, leases: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match fs::metadata(state_dir) {
        Ok(meta) if meta.mode() & 0o077 != 0 => {
            fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::state("make private", state_dir, e))?;
        }
        _ => {}
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(leases)
        .map_err(|e| Error::state("create", leases, e))
}

/// The next-address hint, if there is a readable one.
fn read_cursor(cfg: &NetConfig) -> Option<Ipv4Addr> {
    fs::read_to_string(cursor_path(cfg))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Overwrites the hint in place at a fixed width (readers trim): truncating
/// would free the file's disk block and allocate another on every run, which
/// on a disk mounted with `discard` is a synchronous trim (~0.7 ms measured).
fn write_cursor(cfg: &NetConfig, next: Ipv4Addr) {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let text = format!("{:<15}\n", next.to_string());
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(cursor_path(cfg));
    if let Ok(file) = file {
        let _ = file.write_all_at(text.as_bytes(), 0);
    }
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::state("create", path, e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| Error::state("write", path, e))
}

/// Replaces a lease file atomically (after its ports were resolved).
pub(crate) fn store(cfg: &NetConfig, lease: &Lease) -> Result<()> {
    let dir = dir(cfg);
    let tmp = tmp_path(&dir);
    write_file(&tmp, &lease.to_text())?;
    let path = lease.file(cfg);
    fs::rename(&tmp, &path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::state("replace", &path, e)
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// The lease file is this lease's.
    This,
    /// No lease file for the address (already released).
    Missing,
    /// The address now belongs to another sandbox.
    Other,
}

/// Who holds `lease`'s address now.
pub(crate) fn owner(cfg: &NetConfig, lease: &Lease) -> Result<Owner> {
    let path = lease.file(cfg);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let holder = text.lines().find_map(|l| l.strip_prefix("sandbox="));
            Ok(if holder == Some(lease.sandbox_id.as_str()) {
                Owner::This
            } else {
                Owner::Other
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Owner::Missing),
        Err(e) => Err(Error::state("read", &path, e)),
    }
}

pub(crate) fn remove(cfg: &NetConfig, lease: &Lease) -> Result<()> {
    let path = lease.file(cfg);
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::state("remove", &path, e)),
    }
}

/// Every lease under the state directory. Also removes temporary files a
/// crashed process left behind; a lease file that does not parse is an error
/// (it was not written by us, since ours appear atomically).
pub(crate) fn list(cfg: &NetConfig) -> Result<Vec<Lease>> {
    let dir = dir(cfg);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::state("read", &dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::state("read", &dir, e))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".tmp-") {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > STALE_TMP);
            if old {
                let _ = fs::remove_file(&path);
            }
            continue;
        }
        if name.parse::<Ipv4Addr>().is_err() {
            continue;
        }
        match Lease::load(&path) {
            Ok(l) => out.push(l),
            // Released between read_dir and read: not ours to report.
            Err(Error::State { ref source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Protocol;

    #[test]
    fn text_round_trip() {
        let l = Lease {
            sandbox_id: "sb-1".into(),
            ip: Ipv4Addr::new(10, 209, 0, 7),
            prefix: 16,
            gateway: Ipv4Addr::new(10, 209, 0, 1),
            bridge: "agentkernel0".into(),
            host_veth: "ak123456-7".into(),
            ports: vec![PortMapping {
                host_ip: Ipv4Addr::LOCALHOST,
                host_port: 8080,
                container_port: 80,
                protocol: Protocol::Udp,
            }],
        };
        assert_eq!(Lease::parse(&l.to_text()).unwrap(), l);
        assert!(Lease::parse("garbage").is_err());
    }

    #[test]
    fn the_hint_is_overwritten_in_place_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = NetConfig::new(dir.path());
        fs::create_dir_all(cursor_path(&cfg).parent().unwrap()).unwrap();
        // As the old code wrote it (truncated, no padding), then shorter and
        // longer addresses over it: each reads back exactly.
        fs::write(cursor_path(&cfg), "10.209.255.254\n").unwrap();
        assert_eq!(read_cursor(&cfg), Some(Ipv4Addr::new(10, 209, 255, 254)));
        for ip in [
            Ipv4Addr::new(10, 209, 0, 5),
            Ipv4Addr::new(10, 209, 100, 200),
        ] {
            write_cursor(&cfg, ip);
            assert_eq!(read_cursor(&cfg), Some(ip));
        }
        assert_eq!(fs::metadata(cursor_path(&cfg)).unwrap().len(), 16);
    }

    #[test]
    fn ids_are_checked() {
        assert!(validate_id("abc-1_2.3").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id("a b").is_err());
        assert!(validate_id("a:b").is_err());
    }
}
