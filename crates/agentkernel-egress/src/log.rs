//! `--egress-log FILE`: one JSON line per connection (tunnels, refusals) and
//! per intercepted or plain-HTTP request. Secret names, never values.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use serde::Serialize;

use crate::Error;

pub struct EgressLog {
    file: Mutex<File>,
}

#[derive(Debug, Default, Serialize)]
pub struct Entry {
    pub time: String,
    /// `tunnel`, `intercept`, `http` (plain, absolute-form) or `deny`.
    pub kind: &'static str,
    pub host: String,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub status: u16,
    /// Bytes from the sandbox (tunnels) — request bodies are not counted.
    pub bytes_sent: u64,
    /// Bytes to the sandbox: the tunnel's, or the response body's.
    pub bytes_received: u64,
    pub injected: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl EgressLog {
    pub fn open(path: &Path) -> Result<Self, Error> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::Io(format!("egress log {}: {e}", path.display())))?;
        Ok(EgressLog {
            file: Mutex::new(file),
        })
    }

    pub fn write(&self, mut entry: Entry) {
        entry.time = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut line = serde_json::to_vec(&entry).expect("log entry serializes");
        line.push(b'\n');
        // One write per line on an O_APPEND file: lines never interleave.
        let _ = self.file.lock().expect("log lock").write_all(&line);
    }
}

/// A response body that counts what it carries and writes its log line when
/// it is dropped (finished or abandoned).
pub struct Counted<B> {
    inner: B,
    log: Arc<EgressLog>,
    entry: Option<Entry>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, log: Arc<EgressLog>, entry: Entry) -> Self {
        Counted {
            inner,
            log,
            entry: Some(entry),
        }
    }
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        if let Some(entry) = self.entry.take() {
            self.log.write(entry);
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let (Some(data), Some(entry)) = (frame.data_ref(), self.entry.as_mut()) {
                entry.bytes_received += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
