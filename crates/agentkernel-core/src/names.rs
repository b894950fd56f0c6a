//! Sandbox names: generated `run-<8 hex>`, git-derived `<project>-<branch>`,
//! and the rule every name given by a user obeys: upstream's (letters of
//! either case, digits, `-` and `_`, starting and ending with a letter or
//! digit, at most 63 characters). Such a name is always one safe path
//! component (no `/`, never `.` or `..`, no NUL, no leading `.` that would
//! look like the state store's temporaries) and a valid Docker/Podman
//! container name and hostname.

use crate::{Error, Result};

pub const MAX_LEN: usize = 63;

/// A fresh `run-<8 hex>` name from the kernel's random source.
pub fn generated() -> String {
    let mut bytes = [0u8; 4];
    // SAFETY: `bytes` is a valid writable buffer of the length passed.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // getrandom cannot fail for 4 bytes on any supported kernel; fall back to time and pid.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        bytes = (t ^ std::process::id().rotate_left(16)).to_le_bytes();
    }
    format!("run-{:08x}", u32::from_le_bytes(bytes))
}

/// A stable 64-bit hash (FNV-1a) for keys and file names derived from
/// content; not for security.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Lowercases, maps anything outside `[a-z0-9]` to `-`, collapses and trims dashes.
pub fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// `<project>-<branch>`, sanitized and cut to 63 characters.
pub fn for_branch(project: &str, branch: &str) -> Result<String> {
    let mut name = sanitize(&format!("{project}-{branch}"));
    name.truncate(MAX_LEN);
    let name = name.trim_end_matches('-').to_string();
    if name.is_empty() {
        return Err(Error::Git(format!(
            "cannot make a sandbox name from project `{project}` and branch `{branch}`"
        )));
    }
    Ok(name)
}

/// Checks a name given by the user (e.g. to `exec`).
pub fn validate(name: &str) -> Result<()> {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    let ok = name.len() <= MAX_LEN
        && alnum(name.chars().next())
        && alnum(name.chars().last())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid("sandbox name", name, RULE))
    }
}

/// The rule, as error messages state it.
pub const RULE: &str = "use letters, digits, `-` and `_`, starting and ending with a letter or digit, at most 63 characters";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_are_valid_and_differ() {
        let a = generated();
        let b = generated();
        assert!(a.starts_with("run-") && a.len() == 12, "{a}");
        validate(&a).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn branch_names() {
        assert_eq!(
            for_branch("myapp", "feature/auth").unwrap(),
            "myapp-feature-auth"
        );
        assert_eq!(
            for_branch("My_App", "Fix--Bug__2").unwrap(),
            "my-app-fix-bug-2"
        );
        let long = for_branch(&"p".repeat(40), &"b".repeat(40)).unwrap();
        assert_eq!(long.len(), 63);
        validate(&long).unwrap();
        // Truncation must not leave a trailing dash.
        let cut = for_branch(&"p".repeat(62), "x").unwrap();
        assert!(!cut.ends_with('-'));
        assert!(for_branch("///", "___").is_err());
    }

    #[test]
    fn validation() {
        for ok in [
            "run-abcd1234",
            "a",
            "myapp-main",
            "My_Project",
            "A",
            "a_b",
            "x--y",
        ] {
            validate(ok).unwrap();
        }
        let too_long = "x".repeat(64);
        for bad in [
            "", "-a", "a-", "_a", "a_", ".", "..", ".a", "a.b", "a/b", "a\0b", "a b", "ä",
            &too_long,
        ] {
            assert!(validate(bad).is_err(), "{bad}");
        }
    }
}
