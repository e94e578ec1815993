//! TLS for HTTPS sources: rustls (through ureq), trusting either the system's roots or — with a
//! `ca_file` / `--registry-ca` — only the CA certificates in that PEM file. A certificate that
//! does not verify is a failure no retry can fix: it is reported at once, saying so.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// A client config trusting only the certificates in `ca_file` (PEM); `None` (the system's
/// roots) without one.
pub fn client_config(ca_file: Option<&Path>) -> std::io::Result<Option<Arc<rustls::ClientConfig>>> {
    let Some(path) = ca_file else {
        return Ok(None);
    };
    let bad = |e: String| std::io::Error::other(format!("CA file {}: {e}", path.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(Arc::new(config)))
}

/// The TLS failure behind a transport error, if that is what it is (a certificate that does not
/// verify, a handshake refused).
pub fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t.to_string());
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(t) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(t.to_string());
            }
        }
        cur = err.source();
    }
    None
}
