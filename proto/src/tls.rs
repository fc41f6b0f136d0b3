//! Authenticated cluster links: mutual TLS between the nodes of a cluster (router ↔ worker,
//! worker / router ↔ coordinator), the node identities their certificates carry, and a
//! throw-away cluster CA for local clusters.
//!
//! Every node holds the cluster CA's certificate and a certificate of its own, signed by that
//! CA, whose subject alternative names say what it is:
//! - a URI `spiffe://switchyard.cluster/<role>/<name>` (SPIFFE's form): the identity servers
//!   check per call, e.g. a worker serves `Forward` only to a `router`, and the coordinator
//!   takes a heartbeat for a worker id only from the `worker` certificate that registered it;
//! - a DNS name `<role>.switchyard.cluster`: the server name a client checks, so a router
//!   dialling a worker knows it reached a cluster worker, whatever address it dialled.
//!
//! The TLS handshake asks for a client certificate but does not require one, so health checks
//! and reflection stay reachable (over TLS) without one; each service refuses a call whose
//! certificate has the wrong role ([`ClusterLinks::authorize`]). [`ClusterLinks::Insecure`]
//! runs plaintext and checks nothing: nodes take it only when told to (`--insecure-cluster`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

/// The SPIFFE trust domain of every Switchyard cluster, and the DNS suffix of its server names.
pub const TRUST_DOMAIN: &str = "switchyard.cluster";

/// How long a peer may take over its TLS handshake.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What a node is, as its certificate says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Coordinator,
    Router,
    Worker,
    /// An operator's tool (`switchyard status`, `rebalance`): reads cluster state, asks for a
    /// rebalance; never serves.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Coordinator, Role::Router, Role::Worker, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Router => "router",
            Role::Worker => "worker",
            Role::Admin => "admin",
        }
    }

    /// The DNS name a server of this role presents and its clients check.
    pub fn server_name(self) -> String {
        format!("{}.{TRUST_DOMAIN}", self.as_str())
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A node's identity: its role and a name unique among nodes of that role (`worker-0`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeIdentity {
    pub role: Role,
    pub name: String,
}

impl NodeIdentity {
    pub fn new(role: Role, name: impl Into<String>) -> NodeIdentity {
        NodeIdentity {
            role,
            name: name.into(),
        }
    }

    /// `spiffe://switchyard.cluster/<role>/<name>`.
    pub fn uri(&self) -> String {
        format!("spiffe://{TRUST_DOMAIN}/{}/{}", self.role, self.name)
    }

    /// The identity a SPIFFE URI names, if it is one of this trust domain's.
    pub fn from_uri(uri: &str) -> Option<NodeIdentity> {
        let path = uri.strip_prefix("spiffe://")?.strip_prefix(TRUST_DOMAIN)?;
        let (role, name) = path.strip_prefix('/')?.split_once('/')?;
        let role = Role::ALL.into_iter().find(|r| r.as_str() == role)?;
        valid_name(name).then(|| NodeIdentity::new(role, name))
    }

    /// The identity in a certificate's URI SANs (the first of this trust domain's).
    pub fn of_certificate(der: &CertificateDer<'_>) -> Result<NodeIdentity, TlsError> {
        let cert = webpki::EndEntityCert::try_from(der)
            .map_err(|e| TlsError::BadCertificate(format!("{e:?}")))?;
        cert.valid_uri_names()
            .find_map(NodeIdentity::from_uri)
            .ok_or(TlsError::NoIdentity)
    }
}

impl fmt::Display for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} `{}`", self.role, self.name)
    }
}

/// Node names: what fits a DNS label and a URI path segment.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {flag} {path}: {reason}")]
    Read {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("the certificate cannot be parsed: {0}")]
    BadCertificate(String),
    #[error(
        "the certificate names no Switchyard node (no URI SAN `spiffe://{TRUST_DOMAIN}/<role>/<name>`); issue one with `switchyard certs`"
    )]
    NoIdentity,
    #[error("the certificate is not signed by the cluster CA, or is not valid now: {0}")]
    NotSignedByCa(String),
    #[error("this node needs a {expected} certificate, but the one given is for {got}")]
    WrongRole { expected: Role, got: NodeIdentity },
    #[error("bad node name {0:?}: use 1 to 63 letters, digits, `-`, `_` or `.`")]
    BadName(String),
    #[error("cannot issue a certificate: {0}")]
    Issue(String),
    #[error("cannot configure TLS: {0}")]
    Config(String),
}

/// A node's TLS material: the cluster CA and its own certificate and key (PEM).
#[derive(Clone)]
pub struct ClusterTls {
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    identity: NodeIdentity,
}

impl fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("ClusterTls")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

impl ClusterTls {
    /// Reads `--cluster-ca`, `--cert` and `--key`, and checks the certificate: signed by the
    /// CA, valid now, naming a node.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<ClusterTls, TlsError> {
        let tls = ClusterTls::from_pem(
            read("--cluster-ca", ca)?,
            read("--cert", cert)?,
            read("--key", key)?,
        )?;
        Ok(tls)
    }

    /// The same from PEM bytes.
    pub fn from_pem(
        ca_pem: Vec<u8>,
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
    ) -> Result<ClusterTls, TlsError> {
        let ca = CertificateDer::from_pem_slice(&ca_pem)
            .map_err(|e| TlsError::BadCertificate(format!("cluster CA: {e}")))?;
        let leaf = CertificateDer::from_pem_slice(&cert_pem)
            .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
        rustls_pki_types::PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| TlsError::BadCertificate(format!("the key: {e}")))?;
        let anchor = webpki::anchor_from_trusted_cert(&ca)
            .map_err(|e| TlsError::BadCertificate(format!("cluster CA: {e:?}")))?;
        let end = webpki::EndEntityCert::try_from(&leaf)
            .map_err(|e| TlsError::BadCertificate(format!("{e:?}")))?;
        end.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| TlsError::NotSignedByCa(format!("{e:?}")))?;
        let identity = NodeIdentity::of_certificate(&leaf)?;
        Ok(ClusterTls {
            ca_pem,
            cert_pem,
            key_pem,
            identity,
        })
    }

    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    /// The cluster CA's certificate, PEM.
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }

    /// Fails unless this is a certificate for a `role` node.
    pub fn expect_role(&self, role: Role) -> Result<(), TlsError> {
        if self.identity.role == role {
            Ok(())
        } else {
            Err(TlsError::WrongRole {
                expected: role,
                got: self.identity.clone(),
            })
        }
    }

    fn own(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }
}

/// How a node's cluster links run; cheap to clone.
#[derive(Clone, Debug, Default)]
pub enum ClusterLinks {
    /// Mutual TLS with this node's material.
    Tls(Arc<ClusterTls>),
    /// Plaintext, unauthenticated (`--insecure-cluster`, and in-process tests).
    #[default]
    Insecure,
}

impl ClusterLinks {
    pub fn tls(tls: ClusterTls) -> ClusterLinks {
        ClusterLinks::Tls(Arc::new(tls))
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, ClusterLinks::Tls(_))
    }

    /// This node's identity (none when insecure).
    pub fn identity(&self) -> Option<&NodeIdentity> {
        match self {
            ClusterLinks::Tls(t) => Some(t.identity()),
            ClusterLinks::Insecure => None,
        }
    }

    /// An endpoint for a `peer` node at `addr` (`host:port`; a URL's scheme is replaced by the
    /// one these links use).
    pub fn endpoint(&self, addr: &str, peer: Role) -> Result<Endpoint, TlsError> {
        let hostport = addr.split_once("://").map_or(addr, |(_, rest)| rest);
        match self {
            ClusterLinks::Insecure => Endpoint::from_shared(format!("http://{hostport}"))
                .map_err(|e| TlsError::Config(format!("bad address {addr}: {e}"))),
            ClusterLinks::Tls(t) => Endpoint::from_shared(format!("https://{hostport}"))
                .map_err(|e| TlsError::Config(format!("bad address {addr}: {e}")))?
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(&t.ca_pem))
                        .identity(t.own())
                        .domain_name(peer.server_name()),
                )
                .map_err(|e| TlsError::Config(e.to_string())),
        }
    }

    /// A server builder that terminates these links (plain for insecure ones).
    pub fn server(&self) -> Result<Server, TlsError> {
        match self {
            ClusterLinks::Insecure => Ok(Server::builder()),
            ClusterLinks::Tls(t) => Server::builder()
                .tls_config(
                    ServerTlsConfig::new()
                        .identity(t.own())
                        .client_ca_root(Certificate::from_pem(&t.ca_pem))
                        .client_auth_optional(true)
                        // A peer that connects and never finishes its handshake is dropped.
                        .timeout(HANDSHAKE_TIMEOUT),
                )
                .map_err(|e| TlsError::Config(e.to_string())),
        }
    }

    /// The caller of `request`, if it may make this call: over TLS, it must present a
    /// certificate of one of the `allowed` roles (UNAUTHENTICATED without one,
    /// PERMISSION_DENIED with another role). Insecure links let every caller through, as
    /// `None`.
    pub fn authorize<T>(
        &self,
        request: &tonic::Request<T>,
        allowed: &[Role],
        call: &str,
    ) -> Result<Option<NodeIdentity>, tonic::Status> {
        if !self.is_tls() {
            return Ok(None);
        }
        let peer = request.remote_addr();
        let Some(cert) = request
            .peer_certs()
            .and_then(|certs| certs.first().cloned())
        else {
            tracing::warn!(call, ?peer, "refused a call without a client certificate");
            return Err(tonic::Status::unauthenticated(format!(
                "{call} needs a client certificate signed by the cluster CA (role {})",
                roles(allowed)
            )));
        };
        let identity = NodeIdentity::of_certificate(&cert).map_err(|e| {
            tracing::warn!(call, ?peer, error = %e, "refused a call");
            tonic::Status::unauthenticated(format!("{call}: {e}"))
        })?;
        if allowed.contains(&identity.role) {
            Ok(Some(identity))
        } else {
            tracing::warn!(call, ?peer, caller = %identity, "refused a call from the wrong role");
            Err(tonic::Status::permission_denied(format!(
                "{call} is for {} nodes; the caller's certificate is for {identity}",
                roles(allowed)
            )))
        }
    }
}

fn roles(allowed: &[Role]) -> String {
    allowed
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(" or ")
}

/// A cluster CA that issues node certificates (ECDSA P-256), for `switchyard certs` and the
/// throw-away CA of `switchyard up`.
pub struct ClusterCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    not_after: time::OffsetDateTime,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert").finish_non_exhaustive()
    }
}

fn issue_error(e: rcgen::Error) -> TlsError {
    TlsError::Issue(e.to_string())
}

impl ClusterCa {
    /// A new CA whose certificates (its own included) are valid for `valid` from now.
    pub fn generate(valid: std::time::Duration) -> Result<ClusterCa, TlsError> {
        let now = time::OffsetDateTime::now_utc();
        // An hour back, for clocks a little behind.
        let not_before = now - time::Duration::hours(1);
        let not_after = now
            + time::Duration::try_from(valid)
                .map_err(|e| TlsError::Issue(format!("validity {valid:?}: {e}")))?;
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "switchyard cluster CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        let key = rcgen::KeyPair::generate().map_err(issue_error)?;
        let issuer = rcgen::CertifiedIssuer::self_signed(params, key).map_err(issue_error)?;
        Ok(ClusterCa { issuer, not_after })
    }

    /// The CA's certificate, PEM: what every node gets as `--cluster-ca`.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA's private key, PEM (kept only by whoever issues more node certificates).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A certificate for `node`, usable as server and as client.
    pub fn issue(&self, node: &NodeIdentity) -> Result<IssuedCert, TlsError> {
        if !valid_name(&node.name) {
            return Err(TlsError::BadName(node.name.clone()));
        }
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("{} {}", node.role, node.name),
        );
        params.subject_alt_names = vec![
            rcgen::SanType::URI(node.uri().try_into().map_err(issue_error)?),
            rcgen::SanType::DnsName(node.role.server_name().try_into().map_err(issue_error)?),
        ];
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.sign(params)
    }

    /// A server certificate for a client API (`--tls-cert`) answering to `names` (DNS names
    /// or IP addresses), for clients that trust this CA.
    pub fn issue_server(&self, names: &[String]) -> Result<IssuedCert, TlsError> {
        // Cluster clients accept any certificate of this CA that carries a role's server
        // name: a client-API certificate (its key on a client-facing host) must carry none.
        if let Some(n) = names.iter().find(|n| {
            let n = n.trim_end_matches('.').to_ascii_lowercase();
            n == TRUST_DOMAIN || n.ends_with(&format!(".{TRUST_DOMAIN}"))
        }) {
            return Err(TlsError::BadName(format!(
                "{n} (names under {TRUST_DOMAIN} are the cluster's own)"
            )));
        }
        let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(issue_error)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "switchyard API");
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// Signs `params` with a fresh key, valid from an hour ago (for clocks a little behind) to
    /// the CA's own end.
    fn sign(&self, mut params: rcgen::CertificateParams) -> Result<IssuedCert, TlsError> {
        params.use_authority_key_identifier_extension = true;
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = self.not_after;
        let key = rcgen::KeyPair::generate().map_err(issue_error)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(issue_error)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// `node`'s material as a node would load it.
    pub fn node_tls(&self, node: &NodeIdentity) -> Result<ClusterTls, TlsError> {
        let issued = self.issue(node)?;
        ClusterTls::from_pem(
            self.cert_pem().into_bytes(),
            issued.cert_pem.into_bytes(),
            issued.key_pem.into_bytes(),
        )
    }
}

/// Writes a CA and certificates for `nodes` into `dir` (created, mode 0700): `ca.pem`,
/// `ca.key` (only with `keep_ca_key`), and `<name>.pem` / `<name>.key` per node (names must
/// be unique across roles; keys are mode 0600). Returns the files written.
pub fn write_cluster_certs(
    dir: &Path,
    ca: &ClusterCa,
    nodes: &[NodeIdentity],
    keep_ca_key: bool,
) -> Result<Vec<PathBuf>, TlsError> {
    let io = |path: &Path, e: std::io::Error| TlsError::Read {
        flag: "the certificate directory",
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    // Only a directory made here is made private: an existing one (`--out .`) is the
    // user's, and keeps its mode.
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| io(dir, e))?;
        }
    }
    let mut written = Vec::new();
    let mut write = |name: String, text: &str, secret: bool| -> Result<(), TlsError> {
        let path = dir.join(name);
        write_pem(&path, text.as_bytes(), secret).map_err(|e| io(&path, e))?;
        written.push(path);
        Ok(())
    };
    write("ca.pem".into(), &ca.cert_pem(), false)?;
    if keep_ca_key {
        write("ca.key".into(), &ca.key_pem(), true)?;
    }
    let mut seen = std::collections::HashSet::new();
    for node in nodes {
        if !seen.insert(node.name.as_str()) {
            return Err(TlsError::BadName(format!(
                "{} (two nodes have this name)",
                node.name
            )));
        }
        let issued = ca.issue(node)?;
        write(format!("{}.pem", node.name), &issued.cert_pem, false)?;
        write(format!("{}.key", node.name), &issued.key_pem, true)?;
    }
    Ok(written)
}

/// Writes a PEM file: mode 0600 when it is `secret` (a key), 0644 otherwise.
pub fn write_pem(path: &Path, bytes: &[u8], secret: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options.open(path)?;
    // The mode above applies only to a new file; a key written over an old one gets it too.
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> ClusterCa {
        ClusterCa::generate(std::time::Duration::from_secs(3600)).expect("ca")
    }

    #[test]
    fn identity_round_trips_through_a_certificate() {
        let ca = ca();
        let node = NodeIdentity::new(Role::Worker, "worker-3");
        let tls = ca.node_tls(&node).expect("tls");
        assert_eq!(tls.identity(), &node);
        assert!(tls.expect_role(Role::Worker).is_ok());
        let err = tls.expect_role(Role::Router).expect_err("wrong role");
        assert!(
            err.to_string().contains("needs a router certificate"),
            "{err}"
        );
    }

    #[test]
    fn certificate_of_another_ca_is_refused_at_load() {
        let (a, b) = (ca(), ca());
        let issued = b
            .issue(&NodeIdentity::new(Role::Router, "r"))
            .expect("issue");
        let err = ClusterTls::from_pem(
            a.cert_pem().into_bytes(),
            issued.cert_pem.into_bytes(),
            issued.key_pem.into_bytes(),
        )
        .expect_err("foreign certificate");
        assert!(matches!(err, TlsError::NotSignedByCa(_)), "{err}");
    }

    #[test]
    fn uris_outside_the_trust_domain_name_no_node() {
        assert_eq!(
            NodeIdentity::from_uri("spiffe://switchyard.cluster/router/r0"),
            Some(NodeIdentity::new(Role::Router, "r0"))
        );
        for bad in [
            "spiffe://other.domain/router/r0",
            "spiffe://switchyard.cluster/pilot/r0",
            "spiffe://switchyard.cluster/router/",
            "spiffe://switchyard.cluster/router/a/b",
            "https://switchyard.cluster/router/r0",
        ] {
            assert_eq!(NodeIdentity::from_uri(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_api_certificate_may_not_carry_a_cluster_server_name() {
        let ca = ca();
        for name in [
            "worker.switchyard.cluster",
            "*.SWITCHYARD.cluster",
            "switchyard.cluster.",
        ] {
            let err = ca.issue_server(&[name.to_string()]).expect_err(name);
            assert!(err.to_string().contains("the cluster's own"), "{err}");
        }
        assert!(
            ca.issue_server(&["api.example.com".into(), "10.0.0.3".into()])
                .is_ok()
        );
    }

    #[test]
    fn bad_node_names_are_refused() {
        let err = ca()
            .issue(&NodeIdentity::new(Role::Worker, "a b"))
            .expect_err("space");
        assert!(err.to_string().contains("bad node name"), "{err}");
    }
}
