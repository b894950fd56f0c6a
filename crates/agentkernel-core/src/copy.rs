//! What every backend's `sandbox cp` shares: naming the copied entry, and
//! the one-line errors and notices about host paths and skipped entries.

use std::path::Path;

use crate::{Error, Result};

/// A host path that cannot be read or written, naming it.
pub fn host_error(path: &Path, e: std::io::Error) -> Error {
    Error::invalid("host path", path.to_string_lossy(), e.to_string())
}

/// The last component of a path, for copying into a directory.
pub fn base_name(path: &str) -> Result<&str> {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|b| !b.is_empty() && *b != "." && *b != "..")
        .ok_or_else(|| Error::invalid("cp path", path, "names no file"))
}

/// One notice line per entry a directory copy left out.
pub fn report_skipped(skipped: &[String], why: &str) {
    for path in skipped {
        eprintln!("agentkernel: notice: {path} skipped: {why}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_names() {
        assert_eq!(base_name("/a/b/").unwrap(), "b");
        assert_eq!(base_name("file").unwrap(), "file");
        assert!(base_name("/").is_err());
        assert!(base_name("/a/..").is_err());
    }
}
