//! Choosing this machine's entry from a manifest list / OCI image index.

use std::fmt;

use serde::Deserialize;

/// An OCI platform: `linux/amd64`, `linux/arm/v7`, `linux/arm64/v8`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Platform {
    /// Operating system (`linux`).
    pub os: String,
    /// CPU architecture, Go-style (`amd64`, `arm64`, `arm`).
    pub architecture: String,
    /// CPU variant (`v7`, `v8`), when the architecture has them.
    #[serde(default)]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this binary runs on (linux plus the Go name of the CPU).
    pub fn host() -> Platform {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "x86" => ("386", None),
            "aarch64" => ("arm64", Some("v8")),
            // 32-bit ARM: v7 is what every current distribution targets.
            "arm" => ("arm", Some("v7")),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "powerpc64" => ("ppc64", None),
            "loongarch64" => ("loong64", None),
            "mips64" if cfg!(target_endian = "little") => ("mips64le", None),
            other => (other, None),
        };
        Platform {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: variant.map(Into::into),
        }
    }

    /// Parses `os/arch[/variant]`.
    pub fn parse(s: &str) -> Option<Platform> {
        let mut parts = s.split('/');
        let os = parts.next().filter(|p| !p.is_empty())?;
        let architecture = parts.next().filter(|p| !p.is_empty())?;
        let variant = parts.next().map(str::to_string);
        if parts.next().is_some() || variant.as_deref() == Some("") {
            return None;
        }
        Some(Platform {
            os: os.into(),
            architecture: architecture.into(),
            variant,
        })
    }

    /// How well an image built for `candidate` runs here: `None` if it
    /// cannot, higher is better. An exact variant beats an older compatible
    /// one (arm/v6 code runs on v7), which beats an entry with no variant.
    pub(crate) fn score(&self, candidate: &Platform) -> Option<u32> {
        if !candidate.os.eq_ignore_ascii_case(&self.os)
            || normalize_arch(&candidate.architecture) != normalize_arch(&self.architecture)
        {
            return None;
        }
        let arch = normalize_arch(&self.architecture);
        let want = normalize_variant(arch, self.variant.as_deref());
        let have = normalize_variant(arch, candidate.variant.as_deref());
        match (want, have) {
            (_, None) => Some(1),
            (Some(w), Some(h)) if w == h => Some(1000),
            // Same family, older revision: compatible, the nearer the better.
            (Some(w), Some(h)) => match (variant_level(w), variant_level(h)) {
                (Some(w), Some(h)) if h < w => Some(999 - (w - h)),
                _ => None,
            },
            // We do not know our own variant: only the baseline is safe.
            (None, Some(_)) => None,
        }
    }

    /// Picks the best entry among `candidates`; ties go to the earliest, as
    /// registries list the preferred entry first.
    pub(crate) fn select<'a, I>(&self, candidates: I) -> Option<usize>
    where
        I: IntoIterator<Item = Option<&'a Platform>>,
    {
        let mut best: Option<(usize, u32)> = None;
        for (i, candidate) in candidates.into_iter().enumerate() {
            let Some(score) = candidate.and_then(|c| self.score(c)) else {
                continue;
            };
            if best.is_none_or(|(_, s)| score > s) {
                best = Some((i, score));
            }
        }
        best.map(|(i, _)| i)
    }
}

fn normalize_arch(arch: &str) -> &str {
    match arch {
        "x86_64" | "x86-64" => "amd64",
        "aarch64" => "arm64",
        "i386" | "i686" => "386",
        "armhf" | "armel" => "arm",
        other => other,
    }
}

/// The baseline variant is the same as none: `arm64` means `arm64/v8`,
/// `amd64` means `amd64/v1`.
fn normalize_variant<'a>(arch: &str, variant: Option<&'a str>) -> Option<&'a str> {
    match (arch, variant) {
        ("arm64", Some("v8") | None) => None,
        ("amd64", Some("v1") | None) => None,
        (_, v) => v.filter(|v| !v.is_empty()),
    }
}

fn variant_level(v: &str) -> Option<u32> {
    v.strip_prefix('v')?.parse().ok()
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        Platform::parse(s).unwrap()
    }

    fn pick(want: &str, list: &[&str]) -> Option<String> {
        let list: Vec<Platform> = list.iter().map(|s| p(s)).collect();
        p(want)
            .select(list.iter().map(Some))
            .map(|i| list[i].to_string())
    }

    #[test]
    fn exact_architecture_wins() {
        let list = [
            "linux/arm64/v8",
            "linux/amd64",
            "linux/arm/v7",
            "linux/s390x",
        ];
        assert_eq!(pick("linux/amd64", &list).as_deref(), Some("linux/amd64"));
        assert_eq!(
            pick("linux/arm64/v8", &list).as_deref(),
            Some("linux/arm64/v8")
        );
        assert_eq!(pick("linux/s390x", &list).as_deref(), Some("linux/s390x"));
        assert_eq!(pick("linux/ppc64le", &list), None);
        assert_eq!(pick("windows/amd64", &list), None);
    }

    #[test]
    fn variants() {
        // Exact variant beats an older one, which beats none; newer never runs.
        let list = ["linux/arm/v5", "linux/arm/v6", "linux/arm/v7", "linux/arm"];
        assert_eq!(pick("linux/arm/v7", &list).as_deref(), Some("linux/arm/v7"));
        assert_eq!(pick("linux/arm/v6", &list).as_deref(), Some("linux/arm/v6"));
        assert_eq!(pick("linux/arm/v8", &list).as_deref(), Some("linux/arm/v7"));
        assert_eq!(pick("linux/arm/v7", &["linux/arm/v8"]), None);
        assert_eq!(
            pick("linux/arm/v7", &["linux/arm"]).as_deref(),
            Some("linux/arm")
        );
        // arm64 without a variant is v8; amd64 without one is v1.
        assert_eq!(
            pick("linux/arm64/v8", &["linux/arm64"]).as_deref(),
            Some("linux/arm64")
        );
        assert_eq!(
            pick("linux/arm64", &["linux/arm64/v8"]).as_deref(),
            Some("linux/arm64/v8")
        );
        assert_eq!(
            pick("linux/amd64", &["linux/amd64/v3", "linux/amd64/v1"]).as_deref(),
            Some("linux/amd64/v1")
        );
        assert_eq!(pick("linux/amd64", &["linux/amd64/v3"]), None);
        assert_eq!(
            pick("linux/amd64/v3", &["linux/amd64/v2", "linux/amd64"]).as_deref(),
            Some("linux/amd64/v2")
        );
    }

    #[test]
    fn ties_go_to_the_first_and_unknowns_are_skipped() {
        let list = [
            Some(p("unknown/unknown")),
            None,
            Some(p("linux/amd64")),
            Some(p("linux/amd64")),
        ];
        assert_eq!(
            p("linux/amd64").select(list.iter().map(|o| o.as_ref())),
            Some(2)
        );
        assert_eq!(normalize_arch("x86_64"), "amd64");
        assert_eq!(
            pick("linux/amd64", &["linux/x86_64"]).as_deref(),
            Some("linux/x86_64")
        );
    }

    #[test]
    fn host_is_linux() {
        let h = Platform::host();
        assert_eq!(h.os, "linux");
        assert!(!h.architecture.is_empty());
        assert!(Platform::parse("linux").is_none());
        assert!(Platform::parse("linux/arm/").is_none());
        assert_eq!(p("linux/arm/v7").to_string(), "linux/arm/v7");
    }
}
