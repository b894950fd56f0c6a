//! Parsers for the small value languages of the CLI and config: durations,
//! byte sizes, `K=V` env pairs, `-v` volumes and `-P` port mappings.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Error, Result};

/// `90s`, `30m`, `1h30m`, `3d`: one or more `<integer><unit>` with unit s, m, h or d.
/// A bare number is rejected: a unit-less TTL is almost always a mistake.
pub fn duration(what: &'static str, text: &str) -> Result<Duration> {
    let bad =
        |why: &str| Error::invalid(what, text, format!("{why} (examples: 90s, 30m, 1h30m, 3d)"));
    let mut total: u64 = 0;
    let mut digits = String::new();
    let mut saw_unit = false;
    for ch in text.trim().chars() {
        if ch.is_ascii_digit() {
            digits.push(ch);
            continue;
        }
        let unit = match ch {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(bad(&format!("unknown unit `{ch}`"))),
        };
        let n: u64 = digits
            .parse()
            .map_err(|_| bad("a number must come before each unit"))?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| bad("too large"))?;
        digits.clear();
        saw_unit = true;
    }
    if !digits.is_empty() || !saw_unit {
        return Err(bad("every number needs a unit"));
    }
    if total == 0 {
        return Err(bad("must be longer than zero"));
    }
    Ok(Duration::from_secs(total))
}

/// A kept sandbox's TTL: a [`duration`], or upstream's forms — bare seconds
/// (`3600`) and `0`, which means no expiry ([`Duration::ZERO`]).
pub fn ttl(what: &'static str, text: &str) -> Result<Duration> {
    let trimmed = text.trim();
    if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit()) {
        return trimmed.parse().map(Duration::from_secs).map_err(|_| {
            Error::invalid(
                what,
                text,
                "too large (examples: 3600, 90s, 30m, 0 for no expiry)",
            )
        });
    }
    if let Some(zero) = trimmed.strip_suffix(['s', 'm', 'h', 'd']) {
        if !zero.is_empty() && zero.bytes().all(|b| b == b'0') {
            return Ok(Duration::ZERO);
        }
    }
    duration(what, text)
}

/// A TTL as [`ttl`] parses it: `never` for no expiry.
pub fn format_ttl(ttl: Duration) -> String {
    if ttl.is_zero() {
        "never".into()
    } else {
        format_duration(ttl)
    }
}

/// Renders a duration the way [`duration`] parses it, largest units first.
pub fn format_duration(d: Duration) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, size) in [("d", 86400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

/// `512m`, `2g`, `1.5g`, `1048576` (bytes). Suffixes are binary (k = 1024), like docker's.
pub fn byte_size(what: &'static str, text: &str) -> Result<u64> {
    let bad = |why: &str| {
        Error::invalid(
            what,
            text,
            format!("{why} (examples: 512m, 2g, 1073741824)"),
        )
    };
    let t = text.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        Some(c) if c.is_ascii_digit() => (t, 1),
        _ => return Err(bad("not a size")),
    };
    // Plain decimals only: Rust's float syntax would also take `1e20`, `inf`.
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(bad("not a size"));
    }
    let value: f64 = num.parse().map_err(|_| bad("not a size"))?;
    if value <= 0.0 {
        return Err(bad("must be greater than zero"));
    }
    let bytes = value * mult as f64;
    // The float-to-integer cast would saturate, and a saturated limit is no limit.
    if bytes >= i64::MAX as f64 {
        return Err(bad("too large"));
    }
    let bytes = bytes as u64;
    // Below this the kernel (and Docker) refuse to start anything at all.
    if bytes < 6 << 20 {
        return Err(bad("must be at least 6m"));
    }
    Ok(bytes)
}

/// Human form of a byte count: `512 MiB`, `2 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (name, size) in UNITS {
        if bytes >= size {
            let v = bytes as f64 / size as f64;
            return if v.fract() == 0.0 {
                format!("{} {name}", v as u64)
            } else {
                format!("{v:.1} {name}")
            };
        }
    }
    format!("{bytes} B")
}

/// CPUs as a positive decimal: `0.5`, `2`.
pub fn cpus(text: &str) -> Result<f64> {
    let v: f64 = text
        .trim()
        .parse()
        .map_err(|_| Error::invalid("--cpus", text, "expected a number such as 0.5 or 2"))?;
    // Below 0.01 the CPU quota would be under the kernel's 1 ms minimum.
    if !v.is_finite() || v < 0.01 {
        return Err(Error::invalid("--cpus", text, "must be at least 0.01"));
    }
    Ok(v)
}

/// `-e K=V` sets a variable; `-e K` copies it from agentkernel's own environment (as docker does).
pub fn env_pair(text: &str) -> Result<(String, String)> {
    let (key, value) = match text.split_once('=') {
        Some((k, v)) => (k.to_string(), v.to_string()),
        None => {
            let v = std::env::var(text).map_err(|_| {
                Error::invalid(
                    "--env",
                    text,
                    "expected KEY=VALUE, or KEY of a variable set in this environment",
                )
            })?;
            (text.to_string(), v)
        }
    };
    let valid = !key.is_empty()
        && !key.starts_with(|c: char| c.is_ascii_digit())
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(Error::invalid(
            "--env",
            text,
            "the name must be letters, digits and _ and not start with a digit",
        ));
    }
    Ok((key, value))
}

/// A host path made visible in the sandbox (`-v HOST:PATH[:ro|:rw]`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Volume {
    pub host: PathBuf,
    pub container: String,
    pub read_only: bool,
}

/// Parses `-v`. The host path must exist: silently creating it (docker's habit)
/// hides typos, and an agent would then write into a directory nobody reads.
pub fn volume(text: &str, cwd: &Path) -> Result<Volume> {
    let bad =
        |why: &str| Error::invalid("--volume", text, format!("{why} (expected HOST:PATH[:ro])"));
    let parts: Vec<&str> = text.split(':').collect();
    let (host, container, read_only) = match parts.as_slice() {
        [h, c] => (*h, *c, false),
        [h, c, "ro"] => (*h, *c, true),
        [h, c, "rw"] => (*h, *c, false),
        [_, _, m] => return Err(bad(&format!("unknown mode `{m}`, use ro or rw"))),
        _ => return Err(bad("wrong number of `:` separated parts")),
    };
    if host.is_empty() || container.is_empty() {
        return Err(bad("empty path"));
    }
    if !container.starts_with('/') {
        return Err(bad("the sandbox path must be absolute"));
    }
    let container = sandbox_mount_target(container).map_err(|why| bad(&why))?;
    let host_path = cwd.join(host);
    let host_path = host_path
        .canonicalize()
        .map_err(|e| bad(&format!("host path {}: {e}", host_path.display())))?;
    Ok(Volume {
        host: host_path,
        container,
        read_only,
    })
}

/// The sandbox's own filesystems: a volume over one of them would replace the
/// root, or the kernel interfaces and devices agentkernel sets up (with their
/// masked and read-only paths), with a host directory.
const RESERVED_MOUNT_TARGETS: [&str; 3] = ["/proc", "/sys", "/dev"];

/// A volume's sandbox path, normalised (`//`, `.` and a trailing `/` dropped),
/// unless it is `/`, contains `..`, or lies on a reserved target.
fn sandbox_mount_target(path: &str) -> std::result::Result<String, String> {
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err("the sandbox path must not contain `..`".into()),
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err(
            "cannot mount over the sandbox's root `/`; pick a directory such as /data".into(),
        );
    }
    let normal = format!("/{}", parts.join("/"));
    for reserved in RESERVED_MOUNT_TARGETS {
        if Path::new(&normal).starts_with(reserved) {
            return Err(format!(
                "{reserved} belongs to the sandbox (the kernel's and agentkernel's own mounts); pick another path such as /data"
            ));
        }
    }
    Ok(normal)
}

/// Refuses a published port given twice, or two mappings of one host port:
/// the second would fail to bind after the sandbox was created.
pub fn reject_duplicate_ports(ports: &[PortMapping]) -> Result<()> {
    for (i, p) in ports.iter().enumerate() {
        for q in &ports[..i] {
            let same_host_port = p.host_port != 0
                && p.host_port == q.host_port
                && p.protocol == q.protocol
                && (p.host_ip == q.host_ip
                    || is_unspecified(&p.host_ip)
                    || is_unspecified(&q.host_ip));
            if p == q || same_host_port {
                return Err(Error::Conflict(format!(
                    "--publish {}: {} is published twice; give each host port once",
                    describe_port(p),
                    if same_host_port {
                        format!("host port {}/{}", p.host_port, p.protocol.as_str())
                    } else {
                        format!("sandbox port {}/{}", p.container_port, p.protocol.as_str())
                    }
                )));
            }
        }
    }
    Ok(())
}

fn is_unspecified(ip: &str) -> bool {
    ip.parse::<std::net::IpAddr>()
        .is_ok_and(|a| a.is_unspecified())
}

fn describe_port(p: &PortMapping) -> String {
    let host = if p.host_port == 0 {
        String::new()
    } else {
        format!("{}:", p.host_port)
    };
    format!(
        "{}:{host}{}/{}",
        p.host_ip,
        p.container_port,
        p.protocol.as_str()
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A published port (`-P [IP:][HOST:]CONTAINER[/udp]`). `host_port` 0 means "pick a free one".
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortMapping {
    pub host_ip: String,
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
}

/// Parses `-P`. Without an IP the port is bound to 127.0.0.1, not to every
/// interface as `docker run -p` does: a sandbox for untrusted code should not be
/// reachable from the network unless the user says so (`-P 0.0.0.0:8080:80`).
pub fn port(text: &str) -> Result<PortMapping> {
    let bad = |why: &str| {
        Error::invalid(
            "--publish",
            text,
            format!("{why} (expected [IP:][HOST:]CONTAINER[/tcp|/udp], e.g. 8080:80 or 3000)"),
        )
    };
    let (spec, protocol) = match text.rsplit_once('/') {
        Some((s, "tcp")) => (s, Protocol::Tcp),
        Some((s, "udp")) => (s, Protocol::Udp),
        Some((_, p)) => return Err(bad(&format!("unknown protocol `{p}`"))),
        None => (text, Protocol::Tcp),
    };
    let num = |s: &str, allow_zero: bool| -> Result<u16> {
        let n: u16 = s
            .parse()
            .map_err(|_| bad(&format!("`{s}` is not a port number")))?;
        if n == 0 && !allow_zero {
            return Err(bad("port 0 is not a port"));
        }
        Ok(n)
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let (ip, host, container) = match parts.as_slice() {
        [c] => ("127.0.0.1", 0, num(c, false)?),
        [h, c] => ("127.0.0.1", num(h, false)?, num(c, false)?),
        [ip, h, c] => {
            if ip.parse::<std::net::IpAddr>().is_err() {
                return Err(bad(&format!("`{ip}` is not an IP address")));
            }
            let h = if h.is_empty() { 0 } else { num(h, false)? };
            (*ip, h, num(c, false)?)
        }
        _ => return Err(bad("too many `:`")),
    };
    Ok(PortMapping {
        host_ip: ip.to_string(),
        host_port: host,
        container_port: container,
        protocol,
    })
}

/// "1 layer", "2 layers".
pub fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration("--ttl", "90s").unwrap(), Duration::from_secs(90));
        assert_eq!(duration("--ttl", "30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(
            duration("--ttl", "1h30m").unwrap(),
            Duration::from_secs(5400)
        );
        assert_eq!(
            duration("--ttl", "3d").unwrap(),
            Duration::from_secs(3 * 86400)
        );
        for bad in [
            "",
            "10",
            "1x",
            "h",
            "0s",
            "1h30",
            "-1h",
            "99999999999999999999d",
        ] {
            assert!(duration("--ttl", bad).is_err(), "{bad} should be rejected");
        }
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
    }

    #[test]
    fn ttls_take_upstream_forms() {
        assert_eq!(ttl("--ttl", "3600").unwrap(), Duration::from_secs(3600));
        assert_eq!(ttl("--ttl", "0").unwrap(), Duration::ZERO);
        assert_eq!(ttl("--ttl", "0s").unwrap(), Duration::ZERO);
        assert_eq!(ttl("--ttl", "1h30m").unwrap(), Duration::from_secs(5400));
        for bad in ["", "1x", "-1", "99999999999999999999999", "1h30"] {
            assert!(ttl("--ttl", bad).is_err(), "{bad} should be rejected");
        }
        assert_eq!(format_ttl(Duration::ZERO), "never");
    }

    #[test]
    fn sizes() {
        assert_eq!(byte_size("--memory", "512m").unwrap(), 512 << 20);
        assert_eq!(byte_size("--memory", "2g").unwrap(), 2 << 30);
        assert_eq!(byte_size("--memory", "2GB").unwrap(), 2 << 30);
        assert_eq!(byte_size("--memory", "1.5g").unwrap(), 3 << 29);
        assert_eq!(byte_size("--memory", "10485760").unwrap(), 10 << 20);
        for bad in [
            "",
            "m",
            "-1g",
            "0",
            "1k",
            "lots",
            "2x",
            "1e20",
            "99999999999g",
            "inf",
            "NaN",
            "1.5e9",
        ] {
            assert!(
                byte_size("--memory", bad).is_err(),
                "{bad} should be rejected"
            );
        }
        assert_eq!(format_bytes(512 << 20), "512 MiB");
    }

    #[test]
    fn cpus_values() {
        assert_eq!(cpus("0.5").unwrap(), 0.5);
        assert!(cpus("0").is_err());
        assert!(cpus("0.001").is_err());
        assert!(cpus("abc").is_err());
    }

    #[test]
    fn env_pairs() {
        assert_eq!(env_pair("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert_eq!(env_pair("A=").unwrap(), ("A".into(), "".into()));
        assert!(env_pair("=x").is_err());
        assert!(env_pair("1A=x").is_err());
        assert!(env_pair("AGENTKERNEL_SURELY_UNSET_VARIABLE").is_err());
    }

    #[test]
    fn volumes() {
        let dir = tempfile::tempdir().unwrap();
        let v = volume(
            &format!("{}:/data:ro", dir.path().display()),
            Path::new("/"),
        )
        .unwrap();
        assert!(v.read_only);
        assert_eq!(v.container, "/data");
        assert!(volume("/nonexistent-agentkernel:/data", Path::new("/")).is_err());
        assert!(volume(&format!("{}:data", dir.path().display()), Path::new("/")).is_err());
        assert!(volume(&format!("{}:/d:rx", dir.path().display()), Path::new("/")).is_err());
        let d = dir.path().display();
        for target in [
            "/",
            "//",
            "/.",
            "/proc",
            "/proc/sys",
            "/sys/",
            "/dev",
            "/dev//shm",
            "/a/../proc",
        ] {
            assert!(
                volume(&format!("{d}:{target}"), Path::new("/")).is_err(),
                "{target}"
            );
        }
        assert_eq!(
            volume(&format!("{d}://data/./x/"), Path::new("/"))
                .unwrap()
                .container,
            "/data/x"
        );
        assert!(volume(&format!("{d}:/procfs"), Path::new("/")).is_ok());
    }

    #[test]
    fn ports() {
        let p = port("8080:80").unwrap();
        assert_eq!(
            (p.host_ip.as_str(), p.host_port, p.container_port),
            ("127.0.0.1", 8080, 80)
        );
        let p = port("3000").unwrap();
        assert_eq!((p.host_port, p.container_port), (0, 3000));
        let p = port("0.0.0.0:53:53/udp").unwrap();
        assert_eq!((p.host_ip.as_str(), p.protocol), ("0.0.0.0", Protocol::Udp));
        for bad in [
            "",
            "x",
            "80:",
            "70000",
            "1:2:3:4",
            "80/sctp",
            "nope:80:80",
            "0",
        ] {
            assert!(port(bad).is_err(), "{bad} should be rejected");
        }
        let ps = |list: &[&str]| list.iter().map(|p| port(p).unwrap()).collect::<Vec<_>>();
        assert!(reject_duplicate_ports(&ps(&["8080", "8080"])).is_err());
        assert!(reject_duplicate_ports(&ps(&["8080:80", "8080:81"])).is_err());
        assert!(reject_duplicate_ports(&ps(&["0.0.0.0:8080:80", "8080:81"])).is_err());
        reject_duplicate_ports(&ps(&["8080:80", "8081:80", "8080:80/udp", "3000"])).unwrap();
    }
}
