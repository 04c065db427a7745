//! The optional TCP listener: TLS 1.2/1.3 (rustls) that requires a client certificate signed
//! by the configured client CA. The certificate's subject is the client's identity
//! (`x509:CN=alice,O=tenant-a`): the Cedar principal of its admissions and the owner of its cells.
//!
//! Handshakes run in their own tasks with a time limit, so a slow or silent client never holds
//! up the others; only finished handshakes reach the HTTP server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
/// Finished handshakes waiting for the HTTP server.
const BACKLOG: usize = 64;
/// Handshakes under way at once; further connections wait in the kernel's listen queue.
const MAX_HANDSHAKES: usize = 256;

/// The `[tls]` section of the configuration: all four keys are needed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Address and port to listen on, e.g. `0.0.0.0:7443`.
    pub listen: SocketAddr,
    /// The daemon's certificate chain (PEM).
    pub cert: PathBuf,
    /// The daemon's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificates (PEM) that sign client certificates; a client without a
    /// certificate from one of them cannot connect.
    pub client_ca: PathBuf,
}

fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("tls.{what} {}: {e}; give PEM certificates", path.display()))?;
    if certs.is_empty() {
        return Err(format!("tls.{what} {}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// The server configuration `c` describes, every file read and checked now.
pub fn server_config(c: &TlsConfig) -> Result<Arc<ServerConfig>, String> {
    let chain = certificates(&c.cert, "cert")?;
    let key = PrivateKeyDer::from_pem_file(&c.key).map_err(|e| {
        format!("tls.key {}: {e}; give the PEM private key of tls.cert", c.key.display())
    })?;
    let mut roots = RootCertStore::empty();
    for ca in certificates(&c.client_ca, "client_ca")? {
        roots.add(ca).map_err(|e| format!("tls.client_ca {}: {e}", c.client_ca.display()))?;
    }
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .map_err(|e| format!("tls.client_ca {}: {e}", c.client_ca.display()))?;
    let mut config = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| {
            format!("tls.cert {} with tls.key {}: {e}", c.cert.display(), c.key.display())
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The identity a verified client certificate gives: `x509:` and its subject as RFC 4514 writes
/// it (`x509:CN=alice,O=tenant-a`, attributes in certificate order, specials escaped).
pub fn identity(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::objects::{oid2abbrev, oid_registry};
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let mut rdns = Vec::new();
    for rdn in parsed.subject().iter() {
        let mut attrs = Vec::new();
        for a in rdn.iter() {
            let key = oid2abbrev(a.attr_type(), oid_registry())
                .map(str::to_owned)
                .unwrap_or_else(|_| a.attr_type().to_id_string());
            let value = match a.as_str() {
                Ok(v) => escape(v),
                Err(_) => format!(
                    "#{}",
                    a.attr_value().data.iter().map(|b| format!("{b:02x}")).collect::<String>()
                ),
            };
            attrs.push(format!("{key}={value}"));
        }
        rdns.push(attrs.join("+"));
    }
    (!rdns.is_empty()).then(|| format!("x509:{}", rdns.join(",")))
}

/// An attribute value escaped as RFC 4514 says, so that no subject can pass for another.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
            || (i == 0 && matches!(c, ' ' | '#'))
            || (i == last && c == ' ');
        if c.is_control() {
            out.push_str(&format!("\\{:02x}", u32::from(c)));
            continue;
        }
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// TLS connections whose handshake finished, with the client's identity.
pub struct TlsListener {
    /// Where it listens (port 0 in the configuration picks a free one).
    pub local: SocketAddr,
    done: mpsc::Receiver<(TlsStream<TcpStream>, Option<String>)>,
}

impl TlsListener {
    /// Binds `c.listen` and starts accepting.
    pub async fn bind(c: &TlsConfig) -> Result<TlsListener, String> {
        let acceptor = TlsAcceptor::from(server_config(c)?);
        let tcp = TcpListener::bind(c.listen)
            .await
            .map_err(|e| format!("tls.listen {}: {e}", c.listen))?;
        let local = tcp.local_addr().map_err(|e| format!("tls.listen {}: {e}", c.listen))?;
        let (tx, done) = mpsc::channel(BACKLOG);
        tokio::spawn(accept_loop(tcp, acceptor, tx));
        Ok(TlsListener { local, done })
    }
}

async fn accept_loop(
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    done: mpsc::Sender<(TlsStream<TcpStream>, Option<String>)>,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
        let stream = match tcp.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors and the like: wait rather than spin.
                eprintln!("isocelld: tls accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let tx = done.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_LIMIT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                // A failed handshake already told the client why (a TLS alert).
                _ => return,
            };
            let who =
                tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(identity);
            let _ = tx.send((tls, who)).await;
        });
        if done.is_closed() {
            return;
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = Option<String>;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.done.recv().await {
            Some(c) => c,
            // The accept loop only ends when this receiver is gone.
            None => std::future::pending().await,
        }
    }

    /// The listener itself has no client identity.
    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_escaped_so_none_passes_for_another() {
        assert_eq!(escape("alice"), "alice");
        assert_eq!(escape("a,O=root"), "a\\,O\\=root");
        assert_eq!(escape(" #x "), "\\ #x\\ ");
        assert_eq!(escape("#x"), "\\#x");
        assert_eq!(escape("a\nb"), "a\\0ab");
    }
}
