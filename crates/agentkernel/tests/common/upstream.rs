//! A loopback HTTPS upstream for the egress proxy's tests: a Python server
//! with a CA of its own (given to the proxy with `[proxy] ca_file`, its
//! names pointed at it with `[proxy] resolve`) that records what arrives.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{stderr, TestEnv};

pub const API: &str = "api.example.test";

/// A Python HTTPS server on the host's loopback with a CA of its own; it
/// answers "ok" and appends each request's head to `seen`.
pub struct Upstream {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SERVER: &str = r#"
import http.server, ssl, sys
d = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with open(d + "/seen", "a") as f:
            f.write(self.requestline + "\n" + str(self.headers) + "\n")
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "https://other.example.test/landed")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/big":
            # 2 MiB of a known pattern: bulk traffic through a tunnel.
            body = bytes(range(256)) * 8192
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
c.load_cert_chain(d + "/leaf.pem", d + "/leaf.key")
s.socket = c.wrap_socket(s.socket, server_side=True)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

/// Starts `command` and returns it with the first line it prints.
pub fn spawn_for_first_line(command: &mut Command) -> (Child, String) {
    let mut child = command.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line)
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
}

pub fn start_upstream() -> Upstream {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        d,
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=egress test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign",
            ],
        ]
        .concat(),
    );
    openssl(
        d,
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "leaf.key",
                "-out",
                "leaf.csr",
                "-subj",
                "/CN=api.example.test",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        d.join("leaf.ext"),
        "subjectAltName=DNS:api.example.test,DNS:other.example.test\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
        ],
    );
    // A rootless agentkernel's proxy (another uid) reads the CA.
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(d.join("ca.pem"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (child, line) =
        spawn_for_first_line(Command::new("python3").args(["-c", SERVER, d.to_str().unwrap()]));
    Upstream {
        port: line.trim().parse().unwrap(),
        child,
        dir,
    }
}

impl Upstream {
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn seen(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("seen")).unwrap_or_default()
    }

    /// A config file: the upstream's CA for the proxy, its name pointed at it.
    pub fn config(&self, env: &TestEnv, extra: &str) -> PathBuf {
        self.config_in(env.home_dir(), extra)
    }

    /// The same, written to `dir` (readable by every user, for a rootless
    /// agentkernel's proxy, as the upstream's CA is).
    pub fn config_in(&self, dir: &Path, extra: &str) -> PathBuf {
        let file = dir.join("egress.toml");
        std::fs::write(
            &file,
            format!(
                "[proxy]\nca_file = \"{}\"\nresolve = {{ \"{API}\" = \"127.0.0.1:{}\", \"other.example.test\" = \"127.0.0.1:{}\" }}\n{extra}",
                self.ca().display(),
                self.port,
                self.port
            ),
        )
        .unwrap();
        file
    }
}

/// Python (with `os` imported and `needle` the value as bytes) that prints
/// `found [...]`: every file outside /proc, /sys and /dev, and every
/// visible process's environment and command line, that holds the needle.
pub const FIND_NEEDLE: &str = r#"
found = []
for top in os.listdir("/"):
    if top in ("proc", "sys", "dev"):
        continue
    for d, _, files in os.walk("/" + top):
        for f in files:
            p = os.path.join(d, f)
            try:
                if os.path.isfile(p) and not os.path.islink(p) and needle in open(p, "rb").read():
                    found.append(p)
            except OSError:
                pass
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    for what in ("environ", "cmdline"):
        try:
            if needle in open("/proc/%s/%s" % (pid, what), "rb").read():
                found.append("/proc/%s/%s" % (pid, what))
        except OSError:
            pass
print("found", found)
"#;

/// A listener on every address of the host, and `address:port` for it: a
/// target a sandbox must not reach directly.
pub fn listening_on(address: &str) -> (std::net::TcpListener, String) {
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, format!("{address}:{port}"))
}
