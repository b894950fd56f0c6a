//! Docker-style image references and content digests.
//!
//! Parsing follows Docker's normalisation (distribution/reference): a first
//! path component is a registry host only if it contains `.` or `:`, is
//! `localhost`, or has upper-case letters; otherwise the image is on Docker
//! Hub, where one-component names live under `library/`. No tag and no digest
//! means `:latest`.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use crate::error::Error;

/// Docker Hub's canonical domain, as it appears in references.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that actually serves Docker Hub's registry API.
pub const DOCKER_HUB_REGISTRY: &str = "registry-1.docker.io";

/// A content digest, `sha256:<64 lowercase hex>`. Only sha256 is supported:
/// it is what every registry and image builder produces.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parses `sha256:<hex>`; anything else (other algorithms, upper case,
    /// wrong length) is rejected so a digest can always be used as a file name.
    pub fn parse(s: &str) -> Result<Digest, String> {
        let Some((algo, hex)) = s.split_once(':') else {
            return Err(format!(
                "digest `{s}` has no algorithm (expected sha256:<hex>)"
            ));
        };
        if algo != "sha256" {
            return Err(format!(
                "digest algorithm `{algo}` is not supported (only sha256)"
            ));
        }
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!("digest `{s}` is not 64 lowercase hex digits"));
        }
        Ok(Digest(s.to_string()))
    }

    /// The sha256 digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest::from_hasher(Sha256::new_with_prefix(data))
    }

    pub(crate) fn from_hasher(hasher: Sha256) -> Digest {
        Digest(format!("sha256:{}", hex(&hasher.finalize())))
    }

    /// `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The hex part alone (a file name in the store).
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// The first 12 hex digits, as Docker abbreviates image IDs.
    pub fn short(&self) -> &str {
        &self.hex()[..12]
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Digest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Digest::parse(s)
    }
}

/// A parsed image reference: `[domain/]repository[:tag][@digest]`.
///
/// `alpine:3.20` is `docker.io/library/alpine:3.20`; `localhost:5000/x/y:t`
/// is on the registry `localhost:5000`; `x@sha256:…` pins content.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    domain: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// Parses a Docker-style reference, normalising it as Docker does.
    pub fn parse(input: &str) -> Result<Reference, Error> {
        let invalid = |reason: String| Error::InvalidReference {
            input: input.to_string(),
            reason,
        };
        if input.is_empty() {
            return Err(invalid("it is empty".into()));
        }
        if input.len() > 512 {
            return Err(invalid("it is longer than 512 characters".into()));
        }
        if let Some(c) = input.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid(format!("it contains {c:?}")));
        }
        let (name, digest) = match input.split_once('@') {
            Some((name, digest)) => (name, Some(Digest::parse(digest).map_err(invalid)?)),
            None => (input, None),
        };
        // A tag is a `:` after the last `/` (a `:` before it is a port).
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name[last_slash..].rfind(':') {
            Some(i) => {
                let (n, t) = name.split_at(last_slash + i);
                (n, Some(t[1..].to_string()))
            }
            None => (name, None),
        };
        if let Some(tag) = &tag {
            validate_tag(tag).map_err(invalid)?;
        }
        let (domain, remainder) = match name.split_once('/') {
            Some((first, rest))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.chars().any(|c| c.is_ascii_uppercase()) =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let domain = if domain == "index.docker.io" {
            DOCKER_HUB.to_string()
        } else {
            domain
        };
        validate_domain(&domain).map_err(invalid)?;
        let repository = if domain == DOCKER_HUB && !remainder.contains('/') {
            format!("library/{remainder}")
        } else {
            remainder
        };
        validate_repository(&repository).map_err(invalid)?;
        if domain.len() + 1 + repository.len() > 255 {
            return Err(invalid("the name is longer than 255 characters".into()));
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(Reference {
            domain,
            repository,
            tag,
            digest,
        })
    }

    /// The registry domain as written in references (`docker.io`, `localhost:5000`).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The repository path within the registry (`library/alpine`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if any (`latest` when neither tag nor digest was given).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The pinned digest, if any.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// Whether this image lives on Docker Hub (and so is tried on mirrors first).
    pub fn is_docker_hub(&self) -> bool {
        self.domain == DOCKER_HUB
    }

    /// The `host[:port]` that serves the registry API for this reference.
    pub fn registry_host(&self) -> &str {
        if self.is_docker_hub() {
            DOCKER_HUB_REGISTRY
        } else {
            &self.domain
        }
    }

    /// What to ask the registry's manifest endpoint for: the digest when
    /// pinned (content wins over a tag), else the tag.
    pub(crate) fn manifest_target(&self) -> &str {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.as_str(),
            (None, Some(t)) => t,
            (None, None) => "latest",
        }
    }

    /// The short form Docker prints: `alpine:3.20` for Docker Hub's library
    /// images, `user/x:t` for other Hub images, the full form elsewhere.
    pub fn familiar(&self) -> String {
        let name = if self.is_docker_hub() {
            self.repository
                .strip_prefix("library/")
                .unwrap_or(&self.repository)
                .to_string()
        } else {
            format!("{}/{}", self.domain, self.repository)
        };
        self.with_suffix(name)
    }

    fn with_suffix(&self, mut name: String) -> String {
        if let Some(tag) = &self.tag {
            name.push(':');
            name.push_str(tag);
        }
        if let Some(digest) = &self.digest {
            name.push('@');
            name.push_str(digest.as_str());
        }
        name
    }
}

impl fmt::Display for Reference {
    /// The canonical, fully qualified form: `docker.io/library/alpine:3.20`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.with_suffix(format!("{}/{}", self.domain, self.repository)))
    }
}

impl FromStr for Reference {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Reference::parse(s)
    }
}

fn validate_tag(tag: &str) -> Result<(), String> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!("tag `{tag}` is invalid (letters, digits, `_`, `.`, `-`; at most 128; not starting with `.` or `-`)"))
    }
}

fn validate_domain(domain: &str) -> Result<(), String> {
    let (host, port) = if let Some(rest) = domain.strip_prefix('[') {
        // IPv6 literal: `[::1]:5000`.
        let Some((addr, after)) = rest.split_once(']') else {
            return Err(format!("registry `{domain}` has an unclosed `[`"));
        };
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("registry `{domain}` is not a valid IPv6 address"));
        }
        match after.strip_prefix(':') {
            Some(port) => ("", Some(port)),
            None if after.is_empty() => ("", None),
            None => return Err(format!("registry `{domain}` is malformed")),
        }
    } else {
        match domain.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (domain, None),
        }
    };
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("registry `{domain}` has an invalid port"));
        }
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !domain.starts_with('[') && !host.split('.').all(label_ok) {
        return Err(format!("registry `{domain}` is not a valid host name"));
    }
    Ok(())
}

fn validate_repository(repo: &str) -> Result<(), String> {
    for component in repo.split('/') {
        if !valid_path_component(component) {
            return Err(format!(
                "repository `{repo}` is invalid: each `/`-separated part must be lowercase letters and digits, \
                 separated by `.`, `_`, `__` or dashes"
            ));
        }
    }
    Ok(())
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*`
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn docker_hub_short_names() {
        let r = parse("alpine:3.20");
        assert_eq!(r.domain(), "docker.io");
        assert_eq!(r.registry_host(), "registry-1.docker.io");
        assert_eq!(r.repository(), "library/alpine");
        assert_eq!(r.tag(), Some("3.20"));
        assert_eq!(r.to_string(), "docker.io/library/alpine:3.20");
        assert_eq!(r.familiar(), "alpine:3.20");

        let r = parse("alpine");
        assert_eq!(r.tag(), Some("latest"));
        assert_eq!(r.to_string(), "docker.io/library/alpine:latest");

        let r = parse("user/app:v1");
        assert_eq!(r.repository(), "user/app");
        assert_eq!(r.familiar(), "user/app:v1");

        assert_eq!(
            parse("docker.io/alpine").to_string(),
            "docker.io/library/alpine:latest"
        );
        assert_eq!(
            parse("index.docker.io/library/alpine:1").to_string(),
            "docker.io/library/alpine:1"
        );
    }

    #[test]
    fn other_registries() {
        let r = parse("localhost:5000/x/y:tag");
        assert_eq!(r.domain(), "localhost:5000");
        assert_eq!(r.registry_host(), "localhost:5000");
        assert_eq!(r.repository(), "x/y");
        assert_eq!(r.tag(), Some("tag"));
        assert!(!r.is_docker_hub());

        let r = parse("localhost/x");
        assert_eq!(r.domain(), "localhost");
        assert_eq!(r.repository(), "x");

        let r = parse("ghcr.io/owner/img");
        assert_eq!(r.domain(), "ghcr.io");
        assert_eq!(r.tag(), Some("latest"));

        let r = parse("[::1]:5000/a:b");
        assert_eq!(r.domain(), "[::1]:5000");
        assert_eq!(r.repository(), "a");

        let r = parse("127.0.0.1:5000/test/busybox:1");
        assert_eq!(r.registry_host(), "127.0.0.1:5000");
        assert_eq!(r.familiar(), "127.0.0.1:5000/test/busybox:1");
    }

    #[test]
    fn digests() {
        let r = parse(&format!("alpine@{D}"));
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest().unwrap().as_str(), D);
        assert_eq!(r.manifest_target(), D);
        assert_eq!(r.to_string(), format!("docker.io/library/alpine@{D}"));

        // Tag and digest: the digest is what is fetched.
        let r = parse(&format!("localhost:5000/x:1@{D}"));
        assert_eq!(r.tag(), Some("1"));
        assert_eq!(r.manifest_target(), D);

        let d = Digest::parse(D).unwrap();
        assert_eq!(d.short(), "0123456789ab");
        assert_eq!(
            Digest::of(b"").as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn invalid_references() {
        for bad in [
            "",
            "Alpine",
            "alpine:",
            "alpine:-x",
            "a b",
            "alpine@sha256:abc",
            "alpine@md5:0123456789abcdef0123456789abcdef",
            &format!("alpine@{}", D.to_uppercase().replace("SHA256", "sha256")),
            "x//y",
            "x/-y",
            "x/y-",
            "localhost:abc/x",
            "exa_mple.com/x",
            "/x",
            "x/",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        let msg = Reference::parse("Alpine").unwrap_err().to_string();
        assert!(msg.contains("Alpine") && msg.contains("lowercase"), "{msg}");
    }

    #[test]
    fn repository_components() {
        for ok in ["a", "a.b", "a_b", "a__b", "a---b", "a1-2", "0"] {
            assert!(valid_path_component(ok), "{ok}");
        }
        for bad in ["", "_a", "a_", "a..b", "a___b", "a.-b", "A"] {
            assert!(!valid_path_component(bad), "{bad}");
        }
    }
}
