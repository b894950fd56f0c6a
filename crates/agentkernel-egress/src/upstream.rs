//! Connections out: TCP from the host's network (with `[proxy] resolve`
//! overrides), and TLS the proxy verifies itself — the system's roots plus
//! `[proxy] ca_file` — before any secret is sent.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::Error;

pub struct Upstream {
    resolve: BTreeMap<String, String>,
    /// ALPN h2 + http/1.1 (for clients that speak h2) and http/1.1 only.
    tls_h2: TlsConnector,
    tls_h1: TlsConnector,
}

impl Upstream {
    pub fn new(ca_file: Option<&Path>, resolve: BTreeMap<String, String>) -> Result<Self, Error> {
        let mut roots = RootCertStore::empty();
        // Unparsable system certificates are skipped, as every TLS client does.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(file) = ca_file {
            let pem = std::fs::read(file)
                .map_err(|e| Error::Config(format!("proxy.ca_file {}: {e}", file.display())))?;
            let certs = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::Config(format!("proxy.ca_file {}: {e}", file.display())))?;
            if certs.is_empty() {
                return Err(Error::Config(format!(
                    "proxy.ca_file {}: no PEM certificate in it",
                    file.display()
                )));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| Error::Config(format!("proxy.ca_file {}: {e}", file.display())))?;
            }
        }
        let roots = Arc::new(roots);
        let config = |alpn: &[&[u8]]| -> Result<TlsConnector, Error> {
            let mut config = ClientConfig::builder_with_provider(crate::crypto_provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| Error::Config(e.to_string()))?
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(TlsConnector::from(Arc::new(config)))
        };
        Ok(Upstream {
            resolve,
            tls_h2: config(&[b"h2", b"http/1.1"])?,
            tls_h1: config(&[b"http/1.1"])?,
        })
    }

    /// TCP to `host:port`, or to the `[proxy] resolve` address for `host`.
    pub async fn connect_tcp(&self, host: &str, port: u16) -> io::Result<TcpStream> {
        let stream = match self.resolve.get(host) {
            Some(address) => TcpStream::connect(address.as_str()).await?,
            None => TcpStream::connect((host, port)).await?,
        };
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// Verified TLS to `host` (SNI and certificate name = `host`).
    pub async fn connect_tls(
        &self,
        host: &str,
        port: u16,
        offer_h2: bool,
    ) -> io::Result<TlsStream<TcpStream>> {
        let tcp = self.connect_tcp(host, port).await?;
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let connector = if offer_h2 { &self.tls_h2 } else { &self.tls_h1 };
        connector.connect(name, tcp).await
    }
}
