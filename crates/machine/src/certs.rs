//! The machine's TLS: `init` makes a CA, a server certificate for the daemon in the machine
//! (named 127.0.0.1 and localhost, the only names this host reaches it by) and one client
//! certificate for this host's user, then throws the CA's key away, so no other certificate
//! can ever be accepted. The daemon sees the client as `x509:CN=<user>,O=isocell-machine`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::{write_private, MachineError};

fn failed(what: &str) -> impl FnOnce(rcgen::Error) -> MachineError + '_ {
    move |e| MachineError::Failed(format!("making the machine's {what}: {e}"))
}

/// The client's name: this host's user.
fn user() -> String {
    let name = std::env::var("USER").unwrap_or_default();
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        name
    } else {
        // SAFETY: getuid has no preconditions and cannot fail.
        format!("uid-{}", unsafe { libc::getuid() })
    }
}

/// Writes `ca.pem`, `server.pem`, `server.key`, `client.pem` and `client.key` into `dir`.
pub fn make(dir: &Path) -> Result<(), MachineError> {
    let ca_key = KeyPair::generate().map_err(failed("CA key"))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(failed("CA"))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.distinguished_name.push(DnType::CommonName, "isocell machine CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca = ca_params.self_signed(&ca_key).map_err(failed("CA"))?;

    let server_key = KeyPair::generate().map_err(failed("server key"))?;
    let mut server =
        CertificateParams::new(vec!["localhost".to_owned()]).map_err(failed("server"))?;
    server.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    server.distinguished_name.push(DnType::CommonName, "isocelld in an isocell machine");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = server.signed_by(&server_key, &ca, &ca_key).map_err(failed("server"))?;

    let client_key = KeyPair::generate().map_err(failed("client key"))?;
    let mut client = CertificateParams::new(Vec::<String>::new()).map_err(failed("client"))?;
    client.distinguished_name.push(DnType::CommonName, user());
    client.distinguished_name.push(DnType::OrganizationName, "isocell-machine");
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = client.signed_by(&client_key, &ca, &ca_key).map_err(failed("client"))?;

    write_private(&dir.join("ca.pem"), ca.pem().as_bytes())?;
    write_private(&dir.join("server.pem"), server.pem().as_bytes())?;
    write_private(&dir.join("server.key"), server_key.serialize_pem().as_bytes())?;
    write_private(&dir.join("client.pem"), client.pem().as_bytes())?;
    write_private(&dir.join("client.key"), client_key.serialize_pem().as_bytes())
}
