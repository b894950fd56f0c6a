//! agentkernel's one low-level layer, shared by the native runtime (its
//! root filesystem) and the image store (layer extraction):
//!
//! * [`c_string`] — the one rule for handing a name to the kernel: a NUL
//!   byte is an error, never truncated or replaced;
//! * [`beneath`] — walking a path beneath a directory one component at a
//!   time, never following a symlink, so a path from an image cannot lead
//!   out of it;
//! * [`syscall`] — the [`Syscall`](syscall::Syscall) seam through which
//!   mount planning runs, so it is unit-tested without root.
//!
//! rustix where it covers a call; raw libc only where it does not.

pub mod beneath;
pub mod syscall;

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `bytes` as a C string; a NUL byte inside is an error (InvalidInput).
pub fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{}` contains a NUL byte", String::from_utf8_lossy(bytes)),
        )
    })
}

/// [`c_string`] of a path.
pub fn c_path(path: &Path) -> io::Result<CString> {
    c_string(path.as_os_str().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nul_byte_is_an_error_not_a_different_name() {
        assert_eq!(c_string(b"etc/hosts").unwrap().as_bytes(), b"etc/hosts");
        let e = c_string(b"etc\0/hosts").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(c_path(Path::new("a\0b")).is_err());
    }
}
