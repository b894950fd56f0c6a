//! What a receipt needs to know about a run, gathered only when one was
//! asked for. Backends report here from where the facts are (the stream
//! that writes the command's output, the image lookup, the end of the
//! command) without new parameters through every layer; when nothing asked,
//! each report is one relaxed atomic load, so a plain run pays nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::spec::{Outcome, OutputDigests, StreamDigest};

static ENABLED: AtomicBool = AtomicBool::new(false);
static STATE: Mutex<Option<Observed>> = Mutex::new(None);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Running hashes of a command's output and the other facts seen so far.
#[derive(Default)]
pub struct Observed {
    stdout: Hashing,
    stderr: Hashing,
    /// The stream that wrote first. While it is the only one, the combined
    /// hash is its hash: `combined` starts (as a copy of it) only when the
    /// other stream writes, so single-stream output is hashed once, not twice.
    first: Option<Stream>,
    combined: Option<Hashing>,
    pub image_digest: Option<String>,
    pub outcome: Option<Outcome>,
    /// The egress proxy's summary of this command's traffic, when one ran.
    pub egress: Option<serde_json::Value>,
}

#[derive(Default, Clone)]
struct Hashing {
    hash: Sha256,
    bytes: u64,
}

impl Hashing {
    fn update(&mut self, data: &[u8]) {
        self.hash.update(data);
        self.bytes += data.len() as u64;
    }
    fn finish(self) -> StreamDigest {
        StreamDigest {
            sha256: hex::encode(self.hash.finalize()),
            bytes: self.bytes,
        }
    }
}

impl Observed {
    fn stream(&mut self, stream: Stream) -> &mut Hashing {
        match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        }
    }

    pub fn output(&mut self, stream: Stream, data: &[u8]) {
        match self.first {
            None => self.first = Some(stream),
            Some(first) if first != stream && self.combined.is_none() => {
                self.combined = Some(self.stream(first).clone());
            }
            _ => {}
        }
        self.stream(stream).update(data);
        if let Some(combined) = self.combined.as_mut() {
            combined.update(data);
        }
    }

    pub fn digests(mut self) -> OutputDigests {
        let combined = match (self.combined.take(), self.first) {
            (Some(combined), _) => combined,
            (None, Some(only)) => self.stream(only).clone(),
            (None, None) => Hashing::default(),
        };
        OutputDigests {
            stdout: self.stdout.finish(),
            stderr: self.stderr.finish(),
            combined: combined.finish(),
        }
    }
}

/// Starts observing this process's run (`--receipt`).
pub fn enable() {
    *lock() = Some(Observed::default());
    ENABLED.store(true, Ordering::Release);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn lock() -> std::sync::MutexGuard<'static, Option<Observed>> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

fn with(f: impl FnOnce(&mut Observed)) {
    if enabled() {
        if let Some(observed) = lock().as_mut() {
            f(observed);
        }
    }
}

/// Bytes the command wrote, as they are passed on to our own stdout/stderr.
pub fn output(stream: Stream, data: &[u8]) {
    with(|o| o.output(stream, data));
}

/// The content address the image reference resolved to.
pub fn image_digest(digest: impl Into<String>) {
    with(|o| o.image_digest = Some(digest.into()));
}

/// How the command ended. The first report stands: an observed native
/// helper reports the outcome itself (a timeout is not just exit 124), and
/// the code the CLI then finishes with must not replace it.
pub fn outcome(outcome: Outcome) {
    with(|o| {
        o.outcome.get_or_insert(outcome);
    });
}

/// What went through the egress proxy during the command.
pub fn egress(summary: serde_json::Value) {
    with(|o| o.egress = Some(summary));
}

/// Everything observed, and observing stops.
pub fn take() -> Option<Observed> {
    ENABLED.store(false, Ordering::Release);
    lock().take()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_stream_alone_is_also_the_combined_output() {
        let sha = |b: &[u8]| hex::encode(Sha256::digest(b));
        for stream in [Stream::Stdout, Stream::Stderr] {
            let mut o = Observed::default();
            o.output(stream, b"ab");
            o.output(stream, b"c");
            let d = o.digests();
            assert_eq!((d.combined.sha256, d.combined.bytes), (sha(b"abc"), 3));
        }
        let d = Observed::default().digests();
        assert_eq!((d.combined.sha256, d.combined.bytes), (sha(b""), 0));
    }

    #[test]
    fn streams_are_hashed_each_and_combined() {
        let mut o = Observed::default();
        o.output(Stream::Stdout, b"ab");
        o.output(Stream::Stderr, b"c");
        o.output(Stream::Stdout, b"d");
        let d = o.digests();
        let sha = |b: &[u8]| hex::encode(Sha256::digest(b));
        assert_eq!(d.stdout.sha256, sha(b"abd"));
        assert_eq!(d.stderr.sha256, sha(b"c"));
        assert_eq!(d.combined.sha256, sha(b"abcd"));
        assert_eq!(
            (d.stdout.bytes, d.stderr.bytes, d.combined.bytes),
            (3, 1, 4)
        );
    }
}
