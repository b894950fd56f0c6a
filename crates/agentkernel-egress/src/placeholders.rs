//! `--placeholder-secrets`: the sandbox holds `AGENTKERNEL_PLACEHOLDER_…`
//! instead of a value. A placeholder is swapped for its value only in
//! requests to a host its key is bound to; seen in a readable request to any
//! other host it is refused, so code in the sandbox cannot aim it elsewhere.

use std::collections::BTreeSet;

use crate::ProxyConfig;

/// A placeholder of `key` in a request to a host `key` is not bound to.
#[derive(Debug)]
pub struct Foreign(pub String);

/// One key's placeholder and what replaces it in requests to this host:
/// `None` means its key is not bound here, and the request is refused.
type Entry<'a> = (&'a str, &'a [u8], Option<&'a [u8]>);

pub struct Placeholders<'a> {
    entries: Vec<Entry<'a>>,
}

impl<'a> Placeholders<'a> {
    /// `substitute`: false for plain HTTP, where nothing is ever injected
    /// (bound keys' placeholders then go out as they are).
    pub fn for_host(config: &'a ProxyConfig, host: &str, substitute: bool) -> Self {
        let entries = config
            .placeholders
            .iter()
            .map(|(key, placeholder)| {
                let bound = config
                    .egress
                    .bindings
                    .iter()
                    .any(|b| b.key == *key && b.host == host);
                // Bound: the value (or, over plain HTTP, the placeholder
                // itself); not bound: `None`, refused.
                let replacement = match (bound, substitute) {
                    (false, _) => None,
                    (true, true) => config.values.get(key).map(|v| v.as_bytes()),
                    (true, false) => Some(placeholder.as_bytes()),
                };
                (key.as_str(), placeholder.as_bytes(), replacement)
            })
            .collect();
        Placeholders { entries }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The bytes with every bound placeholder replaced (`None`: unchanged);
    /// `used` gets the keys substituted.
    pub fn apply(
        &self,
        bytes: &[u8],
        used: &mut BTreeSet<String>,
    ) -> Result<Option<Vec<u8>>, Foreign> {
        let mut current: Option<Vec<u8>> = None;
        for (key, placeholder, replacement) in &self.entries {
            let haystack = current.as_deref().unwrap_or(bytes);
            if find(haystack, placeholder).is_none() {
                continue;
            }
            let Some(replacement) = replacement else {
                return Err(Foreign(key.to_string()));
            };
            if replacement != placeholder {
                used.insert(key.to_string());
                current = Some(replace_all(haystack, placeholder, replacement));
            }
        }
        Ok(current)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn replace_all(haystack: &[u8], needle: &[u8], replacement: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = haystack;
    while let Some(at) = find(rest, needle) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(replacement);
        rest = &rest[at + needle.len()..];
    }
    out.extend_from_slice(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentkernel_core::egress::SecretBinding;

    fn config() -> ProxyConfig {
        let mut c = ProxyConfig::default();
        c.egress.bindings.push(SecretBinding {
            key: "A".into(),
            host: "a.test".into(),
            header: None,
        });
        c.values.insert("A".into(), "value-a".into());
        c.placeholders.insert("A".into(), "PH_A".into());
        c
    }

    #[test]
    fn bound_placeholder_is_replaced_foreign_is_refused() {
        let c = config();
        let mut used = BTreeSet::new();
        let here = Placeholders::for_host(&c, "a.test", true);
        let out = here.apply(b"x=PH_A&y=PH_A", &mut used).unwrap().unwrap();
        assert_eq!(out, b"x=value-a&y=value-a");
        assert!(used.contains("A"));
        let elsewhere = Placeholders::for_host(&c, "b.test", true);
        assert!(elsewhere.apply(b"x=PH_A", &mut used).is_err());
        let plain = Placeholders::for_host(&c, "a.test", false);
        assert!(plain.apply(b"x=PH_A", &mut used).unwrap().is_none());
    }
}
