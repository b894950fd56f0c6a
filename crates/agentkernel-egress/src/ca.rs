//! The per-sandbox certificate authority. Its private key is generated in the
//! proxy process and never leaves it; the sandbox gets only the certificate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;

use crate::Error;

pub struct CertificateAuthority {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// One key for every leaf: a leaf per host then costs one signature, not
    /// a key generation, on the first request's path.
    leaf_key: KeyPair,
    /// TLS server configurations by host, issued on first use.
    issued: Mutex<HashMap<String, Arc<ServerConfig>>>,
}

impl CertificateAuthority {
    pub fn generate() -> Result<Self, Error> {
        let ca_error = |e: rcgen::Error| Error::Ca(e.to_string());
        let key = KeyPair::generate().map_err(ca_error)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(ca_error)?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "agentkernel sandbox egress CA");
        name.push(DnType::OrganizationName, "agentkernel");
        params.distinguished_name = name;
        // Leaves only: this CA cannot sign intermediates.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).map_err(ca_error)?;
        let leaf_key = KeyPair::generate().map_err(ca_error)?;
        Ok(CertificateAuthority {
            cert,
            key,
            leaf_key,
            issued: Mutex::new(HashMap::new()),
        })
    }

    /// The certificate, PEM: what the sandbox's trust store gets.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// A TLS server configuration presenting a leaf for `host` (a DNS name or
    /// an IP address), offering HTTP/2 and HTTP/1.1.
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, Error> {
        if let Some(config) = self.issued.lock().expect("CA cache").get(host) {
            return Ok(config.clone());
        }
        let ca_error = |e: rcgen::Error| Error::Ca(format!("leaf certificate for {host}: {e}"));
        let mut params = CertificateParams::new(vec![host.to_string()]).map_err(ca_error)?;
        params
            .distinguished_name
            .push(DnType::CommonName, host.to_string());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let leaf = params
            .signed_by(&self.leaf_key, &self.cert, &self.key)
            .map_err(ca_error)?;
        let chain = vec![
            CertificateDer::from(leaf.der().to_vec()),
            CertificateDer::from(self.cert.der().to_vec()),
        ];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(crate::crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Ca(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| Error::Ca(format!("leaf certificate for {host}: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let config = Arc::new(config);
        self.issued
            .lock()
            .expect("CA cache")
            .insert(host.to_string(), config.clone());
        Ok(config)
    }
}
