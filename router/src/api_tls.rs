//! TLS for the client APIs (`--tls-cert` / `--tls-key`): the router's gRPC API through
//! tonic's rustls support, and its HTTP API through a listener that hands axum connections
//! whose handshake is done.
//!
//! Handshakes run on their own tasks, each bounded by [`HANDSHAKE_TIMEOUT`] and at most
//! [`MAX_HANDSHAKES`] at once, so a client that connects and never speaks TLS holds up no
//! other client's connection.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, rustls};

use crate::error::RouterError;

/// How long a client may take over its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more connections wait in the kernel's backlog.
pub const MAX_HANDSHAKES: usize = 256;

/// The client APIs' certificate chain and key (PEM).
#[derive(Clone)]
pub struct ApiTls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for ApiTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiTls").finish_non_exhaustive()
    }
}

fn bad(flag: &str, path: &Path, reason: impl std::fmt::Display) -> RouterError {
    RouterError::Runtime(format!("{flag} {}: {reason}", path.display()))
}

impl ApiTls {
    /// Reads `--tls-cert` (a PEM chain, leaf first) and `--tls-key`, and checks they make a
    /// usable server configuration.
    pub fn load(cert: &Path, key: &Path) -> Result<ApiTls, RouterError> {
        let cert_pem = std::fs::read(cert).map_err(|e| bad("--tls-cert", cert, e))?;
        let key_pem = std::fs::read(key).map_err(|e| bad("--tls-key", key, e))?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| bad("--tls-cert", cert, e))?;
        if chain.is_empty() {
            return Err(bad("--tls-cert", cert, "no certificate in it"));
        }
        let private =
            PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| bad("--tls-key", key, e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| RouterError::Runtime(format!("TLS: {e}")))?
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .map_err(|e| bad("--tls-key", key, format!("does not fit --tls-cert: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ApiTls {
            cert_pem,
            key_pem,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// The gRPC API's server configuration.
    pub fn grpc(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// `listener`'s connections, TLS done, for the HTTP API.
    pub fn listener(&self, listener: TcpListener) -> std::io::Result<TlsListener> {
        TlsListener::new(listener, self.acceptor.clone())
    }
}

/// Accepted connections whose TLS handshake has completed (an `axum::serve::Listener`).
/// Dropping it stops accepting.
#[derive(Debug)]
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let accepting = tokio::spawn(accept_loop(listener, acceptor, tx));
        Ok(TlsListener {
            ready,
            local,
            accepting,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "cannot accept an HTTPS connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = tx.closed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = tx.send((tls, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "tls handshake failed"),
                Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop ended (its runtime is stopping): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_proto::tls::ClusterCa;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn server_files(dir: &Path) -> (ClusterCa, std::path::PathBuf, std::path::PathBuf) {
        let ca = ClusterCa::generate(Duration::from_secs(600)).expect("ca");
        let issued = ca
            .issue_server(&["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("server cert");
        let (cert, key) = (dir.join("api.pem"), dir.join("api.key"));
        std::fs::write(&cert, issued.cert_pem).expect("write");
        std::fs::write(&key, issued.key_pem).expect("write");
        (ca, cert, key)
    }

    fn connector(ca: &ClusterCa) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).expect("ca pem"))
            .expect("root");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_never_handshakes_holds_up_no_other() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca, cert, key) = server_files(dir.path());
        let tls = ApiTls::load(&cert, &key).expect("loads");
        let mut listener = tls
            .listener(TcpListener::bind("127.0.0.1:0").await.expect("bind"))
            .expect("listener");
        let addr = axum::serve::Listener::local_addr(&listener).expect("addr");
        // Echo one byte per accepted connection.
        let server = tokio::spawn(async move {
            loop {
                let (mut io, _) = axum::serve::Listener::accept(&mut listener).await;
                tokio::spawn(async move {
                    let mut b = [0u8; 1];
                    if io.read_exact(&mut b).await.is_ok() {
                        let _ = io.write_all(&b).await;
                    }
                });
            }
        });
        // Stalled clients: TCP open, no ClientHello.
        let mut stalled = Vec::new();
        for _ in 0..4 {
            stalled.push(TcpStream::connect(addr).await.expect("connect"));
        }
        let connector = connector(&ca);
        let clients = (0..16u8).map(|i| {
            let connector = connector.clone();
            async move {
                let tcp = TcpStream::connect(addr).await.expect("connect");
                let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
                let mut tls = connector.connect(name, tcp).await.expect("handshake");
                tls.write_all(&[i]).await.expect("write");
                let mut b = [0u8; 1];
                tls.read_exact(&mut b).await.expect("read");
                assert_eq!(b[0], i);
            }
        });
        tokio::time::timeout(Duration::from_secs(5), futures_join(clients))
            .await
            .expect("16 clients served within 5 s beside 4 stalled ones");
        // A plaintext client gets no HTTP answer, and the listener keeps serving.
        let mut plain = TcpStream::connect(addr).await.expect("connect");
        let _ = plain.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), plain.read_to_end(&mut buf)).await;
        assert!(!String::from_utf8_lossy(&buf).contains("HTTP/1.1 200"));
        drop(stalled);
        server.abort();
    }

    async fn futures_join(
        clients: impl Iterator<Item = impl std::future::Future<Output = ()> + Send + 'static>,
    ) {
        let handles: Vec<_> = clients.map(tokio::spawn).collect();
        for h in handles {
            h.await.expect("client task");
        }
    }

    #[test]
    fn a_key_of_another_certificate_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca, cert, _) = server_files(dir.path());
        let other = ca.issue_server(&["localhost".to_string()]).expect("other");
        let key = dir.path().join("other.key");
        std::fs::write(&key, other.key_pem).expect("write");
        let err = ApiTls::load(&cert, &key).expect_err("mismatch").to_string();
        assert!(
            err.contains("--tls-key") && err.contains("does not fit"),
            "{err}"
        );
        let missing = ApiTls::load(&dir.path().join("nope.pem"), &key)
            .expect_err("missing")
            .to_string();
        assert!(
            missing.contains("--tls-cert") && missing.contains("nope.pem"),
            "{missing}"
        );
    }
}
