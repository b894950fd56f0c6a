//! SFTP (and so OpenSSH 9's `scp`) for a sandbox whose image has no
//! `sftp-server`: the protocol is spoken here, and every file operation is a
//! small POSIX shell script run in the sandbox as `agentkernel exec` runs it
//! (paths are passed as arguments, never spliced into the script). The
//! files are therefore opened by a process inside the sandbox, as its user,
//! in its mount namespace: a symlink resolves inside the sandbox's root,
//! never to a host path. The cost is one `exec` per operation, and a file is
//! held in memory between open and close (written back on close).

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;

use russh_sftp::protocol::{
    Attrs, Data, File, FileAttributes, Handle, Name, OpenFlags, Status, StatusCode, Version,
};
use tokio::io::AsyncWriteExt;

use super::exec::Sandbox;

/// Exit codes of the scripts, mapped to SFTP status codes.
const NO_SUCH_FILE: i32 = 2;
const PERMISSION_DENIED: i32 = 3;

/// Prints one line per file: hex mode, size, uid, gid, atime, mtime, name.
const STAT_FORMAT: &str = "%f %s %u %g %X %Y %n";

enum Open {
    Dir {
        entries: Vec<File>,
        sent: bool,
    },
    Read {
        data: Vec<u8>,
    },
    Write {
        path: String,
        data: Vec<u8>,
        append: bool,
        dirty: bool,
    },
}

pub struct Sftp {
    sandbox: Arc<Sandbox>,
    handles: HashMap<String, Open>,
    next_handle: u64,
}

impl Sftp {
    pub fn new(sandbox: Arc<Sandbox>) -> Sftp {
        Sftp {
            sandbox,
            handles: HashMap::new(),
            next_handle: 0,
        }
    }

    /// Runs `sh -c SCRIPT sh ARGS…` in the sandbox; returns stdout, or the
    /// status its exit code stands for.
    async fn sh(
        &self,
        script: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<Vec<u8>, StatusCode> {
        let argv: Vec<String> = ["/bin/sh", "-c", script, "sh"]
            .iter()
            .chain(args)
            .map(|a| a.to_string())
            .collect();
        let mut command = self
            .sandbox
            .command(&[], &argv, false)
            .map_err(|_| StatusCode::Failure)?;
        command
            .command
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = command.spawn().map_err(|_| StatusCode::Failure)?;
        if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
            let write = pipe.write_all(data).await;
            drop(pipe);
            if write.is_err() {
                let _ = child.wait().await;
                return Err(StatusCode::Failure);
            }
        }
        let output = child
            .wait_with_output()
            .await
            .map_err(|_| StatusCode::Failure)?;
        match output.status.code() {
            Some(0) => Ok(output.stdout),
            Some(NO_SUCH_FILE) => Err(StatusCode::NoSuchFile),
            Some(PERMISSION_DENIED) => Err(StatusCode::PermissionDenied),
            _ => Err(StatusCode::Failure),
        }
    }

    async fn attributes(&self, path: &str, follow: bool) -> Result<FileAttributes, StatusCode> {
        let script = format!(
            "[ -e \"$1\" ] || [ -L \"$1\" ] || exit {NO_SUCH_FILE}; stat {} -c '{STAT_FORMAT}' -- \"$1\"",
            if follow { "-L" } else { "" }
        );
        let out = self.sh(&script, &[path], None).await?;
        parse_stat_line(&String::from_utf8_lossy(&out))
            .map(|(_, attrs)| attrs)
            .ok_or(StatusCode::Failure)
    }

    fn add_handle(&mut self, open: Open) -> String {
        self.next_handle += 1;
        let handle = self.next_handle.to_string();
        self.handles.insert(handle.clone(), open);
        handle
    }

    fn ok(id: u32) -> Status {
        Status {
            id,
            status_code: StatusCode::Ok,
            error_message: "Ok".into(),
            language_tag: "en-US".into(),
        }
    }

    async fn simple(&self, id: u32, script: &str, args: &[&str]) -> Result<Status, StatusCode> {
        self.sh(script, args, None).await.map(|_| Sftp::ok(id))
    }
}

/// `MODE SIZE UID GID ATIME MTIME NAME` (stat's `%f` is the mode in hex).
fn parse_stat_line(line: &str) -> Option<(String, FileAttributes)> {
    let mut fields = line.trim_end_matches('\n').splitn(7, ' ');
    let mut number = |radix| {
        fields
            .next()
            .and_then(|f| u64::from_str_radix(f, radix).ok())
    };
    let mode = number(16)?;
    let size = number(10)?;
    let uid = number(10)?;
    let gid = number(10)?;
    let atime = number(10)?;
    let mtime = number(10)?;
    let name = fields.next()?.to_string();
    Some((
        name,
        FileAttributes {
            size: Some(size),
            uid: Some(uid as u32),
            gid: Some(gid as u32),
            permissions: Some(mode as u32),
            atime: Some(atime as u32),
            mtime: Some(mtime as u32),
            ..Default::default()
        },
    ))
}

impl russh_sftp::server::Handler for Sftp {
    type Error = StatusCode;

    fn unimplemented(&self) -> StatusCode {
        StatusCode::OpUnsupported
    }

    async fn init(
        &mut self,
        _version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<Version, StatusCode> {
        Ok(Version::new())
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, StatusCode> {
        // An existing path is resolved inside the sandbox; a new file's is
        // its resolved directory plus its name (scp asks before creating).
        let script = format!(
            "p=${{1:-.}}; if [ -e \"$p\" ]; then readlink -f -- \"$p\"; else \
             d=$(cd -- \"$(dirname -- \"$p\")\" 2>/dev/null && pwd -P) || exit {NO_SUCH_FILE}; \
             printf '%s/%s\\n' \"${{d%/}}\" \"$(basename -- \"$p\")\"; fi"
        );
        let out = self.sh(&script, &[&path], None).await?;
        let resolved = String::from_utf8_lossy(&out)
            .trim_end_matches('\n')
            .to_string();
        Ok(Name {
            id,
            files: vec![File::dummy(resolved)],
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, StatusCode> {
        let attrs = self.attributes(&path, true).await?;
        Ok(Attrs { id, attrs })
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, StatusCode> {
        let attrs = self.attributes(&path, false).await?;
        Ok(Attrs { id, attrs })
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, StatusCode> {
        let attrs = match self.handles.get(&handle) {
            Some(Open::Read { data }) => FileAttributes {
                size: Some(data.len() as u64),
                permissions: Some(0o100644),
                ..Default::default()
            },
            Some(Open::Write { path, .. }) => {
                let path = path.clone();
                self.attributes(&path, true).await?
            }
            Some(Open::Dir { .. }) => FileAttributes {
                permissions: Some(0o040755),
                ..Default::default()
            },
            None => return Err(StatusCode::Failure),
        };
        Ok(Attrs { id, attrs })
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, StatusCode> {
        let script = format!(
            "[ -e \"$1\" ] || exit {NO_SUCH_FILE}; cd -- \"$1\" || exit {PERMISSION_DENIED}; \
             for f in .* *; do [ -e \"$f\" ] || [ -L \"$f\" ] || continue; \
             stat -c '{STAT_FORMAT}' -- \"$f\"; done"
        );
        let out = self.sh(&script, &[&path], None).await?;
        let entries = String::from_utf8_lossy(&out)
            .lines()
            .filter_map(parse_stat_line)
            .map(|(name, attrs)| File::new(name, attrs))
            .collect();
        let handle = self.add_handle(Open::Dir {
            entries,
            sent: false,
        });
        Ok(Handle { id, handle })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, StatusCode> {
        match self.handles.get_mut(&handle) {
            Some(Open::Dir { entries, sent }) if !*sent => {
                *sent = true;
                Ok(Name {
                    id,
                    files: std::mem::take(entries),
                })
            }
            Some(Open::Dir { .. }) => Err(StatusCode::Eof),
            _ => Err(StatusCode::Failure),
        }
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        _attrs: FileAttributes,
    ) -> Result<Handle, StatusCode> {
        let open = if pflags.contains(OpenFlags::WRITE) || pflags.contains(OpenFlags::APPEND) {
            // Checked (and created) now, so errors come at open, as a client expects.
            let script = format!(
                "if [ -e \"$1\" ]; then [ \"$2\" = exclusive ] && exit 4; [ -d \"$1\" ] && exit 4; \
                 [ -w \"$1\" ] || exit {PERMISSION_DENIED}; \
                 elif [ \"$3\" = create ]; then : >> \"$1\" || exit {PERMISSION_DENIED}; \
                 else exit {NO_SUCH_FILE}; fi; [ \"$4\" = keep ] && cat -- \"$1\"; exit 0"
            );
            let append = pflags.contains(OpenFlags::APPEND);
            let keep = !pflags.contains(OpenFlags::TRUNCATE) && !append;
            let data = self
                .sh(
                    &script,
                    &[
                        &filename,
                        if pflags.contains(OpenFlags::EXCLUDE) {
                            "exclusive"
                        } else {
                            ""
                        },
                        if pflags.contains(OpenFlags::CREATE) {
                            "create"
                        } else {
                            ""
                        },
                        if keep { "keep" } else { "" },
                    ],
                    None,
                )
                .await?;
            Open::Write {
                path: filename,
                data,
                append,
                dirty: pflags.contains(OpenFlags::TRUNCATE),
            }
        } else {
            let script = format!(
                "[ -e \"$1\" ] || exit {NO_SUCH_FILE}; [ -d \"$1\" ] && exit 4; \
                 [ -r \"$1\" ] || exit {PERMISSION_DENIED}; cat -- \"$1\""
            );
            let data = self.sh(&script, &[&filename], None).await?;
            Open::Read { data }
        };
        let handle = self.add_handle(open);
        Ok(Handle { id, handle })
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, StatusCode> {
        let data = match self.handles.get(&handle) {
            Some(Open::Read { data }) | Some(Open::Write { data, .. }) => data,
            _ => return Err(StatusCode::Failure),
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if start >= data.len() {
            return Err(StatusCode::Eof);
        }
        let end = data.len().min(start + len as usize);
        Ok(Data {
            id,
            data: data[start..end].to_vec(),
        })
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        bytes: Vec<u8>,
    ) -> Result<Status, StatusCode> {
        let Some(Open::Write {
            data,
            append,
            dirty,
            ..
        }) = self.handles.get_mut(&handle)
        else {
            return Err(StatusCode::Failure);
        };
        let start = if *append {
            data.len()
        } else {
            usize::try_from(offset).map_err(|_| StatusCode::Failure)?
        };
        if data.len() < start + bytes.len() {
            data.resize(start + bytes.len(), 0);
        }
        data[start..start + bytes.len()].copy_from_slice(&bytes);
        *dirty = true;
        Ok(Sftp::ok(id))
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, StatusCode> {
        match self.handles.remove(&handle) {
            Some(Open::Write {
                path,
                data,
                append,
                dirty: true,
            }) => {
                let script = if append {
                    "cat >> \"$1\""
                } else {
                    "cat > \"$1\""
                };
                self.sh(script, &[&path], Some(&data)).await?;
                Ok(Sftp::ok(id))
            }
            Some(_) => Ok(Sftp::ok(id)),
            None => Err(StatusCode::Failure),
        }
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, StatusCode> {
        match attrs.permissions {
            Some(mode) => {
                let mode = format!("{:o}", mode & 0o7777);
                self.simple(id, "chmod \"$2\" -- \"$1\"", &[&path, &mode])
                    .await
            }
            None => Ok(Sftp::ok(id)),
        }
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        attrs: FileAttributes,
    ) -> Result<Status, StatusCode> {
        match self.handles.get(&handle) {
            Some(Open::Write { path, .. }) => {
                let path = path.clone();
                self.setstat(id, path, attrs).await
            }
            Some(_) => Ok(Sftp::ok(id)),
            None => Err(StatusCode::Failure),
        }
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, StatusCode> {
        let script = format!(
            "[ -e \"$1\" ] || [ -L \"$1\" ] || exit {NO_SUCH_FILE}; [ -d \"$1\" ] && exit 4; rm -f -- \"$1\""
        );
        self.simple(id, &script, &[&filename]).await
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        _attrs: FileAttributes,
    ) -> Result<Status, StatusCode> {
        self.simple(id, "mkdir -- \"$1\"", &[&path]).await
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, StatusCode> {
        let script = format!("[ -e \"$1\" ] || exit {NO_SUCH_FILE}; rmdir -- \"$1\"");
        self.simple(id, &script, &[&path]).await
    }

    async fn rename(
        &mut self,
        id: u32,
        oldpath: String,
        newpath: String,
    ) -> Result<Status, StatusCode> {
        let script = format!(
            "[ -e \"$1\" ] || [ -L \"$1\" ] || exit {NO_SUCH_FILE}; [ -e \"$2\" ] && exit 4; mv -- \"$1\" \"$2\""
        );
        self.simple(id, &script, &[&oldpath, &newpath]).await
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, StatusCode> {
        let out = self.sh("readlink -- \"$1\"", &[&path], None).await?;
        let target = String::from_utf8_lossy(&out)
            .trim_end_matches('\n')
            .to_string();
        Ok(Name {
            id,
            files: vec![File::dummy(target)],
        })
    }
}
