//! The gRPC [`Transport`]: a lazily connected channel per worker (TCP_NODELAY, reconnected by
//! tonic after a failure, so a worker restarted at the same address is reached again without
//! restarting the router), a deadline on every call, and in stream mode one long-lived
//! `ForwardStream` per worker, re-opened by the next call once it breaks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_proto::WorkerId;
use switchyard_proto::tls::{ClusterLinks, Role};
use switchyard_proto::v1::expert_service_client::ExpertServiceClient;
use switchyard_proto::v1::{ForwardRequest, ForwardResponse, InfoRequest};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::transport::{
    ForwardFuture, InfoFuture, Transport, WorkerLink, WorkerReply, call_failed,
};
use crate::error::RouterError;

/// How calls travel: a unary RPC each, or one long-lived bidirectional stream per worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CallMode {
    #[default]
    Unary,
    Stream,
}

/// Connects workers over gRPC.
#[derive(Clone, Debug)]
pub struct GrpcTransport {
    max_message_bytes: usize,
    mode: CallMode,
    links: ClusterLinks,
}

impl GrpcTransport {
    /// Links to workers over `links`: mutual TLS (each worker must present a worker
    /// certificate of the cluster CA) or plaintext.
    pub fn new(max_message_bytes: usize, mode: CallMode, links: ClusterLinks) -> GrpcTransport {
        GrpcTransport {
            max_message_bytes,
            mode,
            links,
        }
    }
}

impl Transport for GrpcTransport {
    fn connect(&self, worker: WorkerId, addr: &str) -> Result<Arc<dyn WorkerLink>, RouterError> {
        let channel = self
            .links
            .endpoint(addr, Role::Worker)
            .map_err(|e| RouterError::Connect {
                worker,
                addr: addr.to_string(),
                reason: e.to_string(),
            })?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        let limit = self.max_message_bytes + (1 << 20);
        let client = ExpertServiceClient::new(channel)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        Ok(Arc::new(GrpcLink {
            worker,
            addr: addr.to_string(),
            client,
            stream: (self.mode == CallMode::Stream).then(|| Arc::new(Mutex::new(None))),
            next_call: AtomicU64::new(1),
        }))
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<WorkerReply, RouterError>>>>>;

/// One open `ForwardStream`: requests go in on `tx`, a reader task hands each reply to the
/// call waiting for its `call_id`. Once the stream breaks, `tx` is closed and every waiting
/// call fails UNAVAILABLE.
#[derive(Clone, Debug)]
struct CallStream {
    tx: mpsc::Sender<ForwardRequest>,
    pending: Pending,
}

struct GrpcLink {
    worker: WorkerId,
    addr: String,
    client: ExpertServiceClient<Channel>,
    /// Stream mode: the open stream, if any (re-opened by the next call once broken).
    stream: Option<Arc<Mutex<Option<CallStream>>>>,
    next_call: AtomicU64,
}

impl std::fmt::Debug for GrpcLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GrpcLink({} at {})", self.worker, self.addr)
    }
}

fn fail_all(pending: &Pending, worker: WorkerId, addr: &str, message: &str) {
    let waiters: Vec<_> = pending
        .lock()
        .map(|mut m| m.drain().collect())
        .unwrap_or_default();
    for (_, tx) in waiters {
        let _ = tx.send(Err(call_failed(
            worker,
            addr,
            usize::MAX,
            tonic::Code::Unavailable,
            message,
        )));
    }
}

async fn open_stream(
    mut client: ExpertServiceClient<Channel>,
    worker: WorkerId,
    addr: String,
) -> Result<CallStream, RouterError> {
    let (tx, rx) = mpsc::channel::<ForwardRequest>(64);
    let replies = client
        .forward_stream(ReceiverStream::new(rx))
        .await
        .map_err(|s| {
            call_failed(
                worker,
                &addr,
                usize::MAX,
                call_code(&s),
                format!("cannot open the call stream: {}", s.message()),
            )
        })?;
    let mut replies = replies.into_inner();
    let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
    let reader_pending = pending.clone();
    tokio::spawn(async move {
        let why = loop {
            match replies.message().await {
                Ok(Some(reply)) => {
                    let waiter = reader_pending
                        .lock()
                        .ok()
                        .and_then(|mut m| m.remove(&reply.call_id));
                    let Some(waiter) = waiter else { continue };
                    let result = if reply.error_code != 0 {
                        Err(call_failed(
                            worker,
                            &addr,
                            usize::MAX,
                            tonic::Code::from(reply.error_code),
                            reply.error_message,
                        ))
                    } else {
                        reply_of(reply).ok_or_else(|| {
                            call_failed(
                                worker,
                                &addr,
                                usize::MAX,
                                tonic::Code::Internal,
                                "reply without output",
                            )
                        })
                    };
                    let _ = waiter.send(result);
                }
                Ok(None) => break "the worker closed the call stream".to_string(),
                Err(status) => break format!("the call stream broke: {status}"),
            }
        };
        tracing::warn!(worker = %worker, addr = %addr, reason = %why, "expert call stream ended; the next call re-opens it");
        fail_all(&reader_pending, worker, &addr, &why);
    });
    Ok(CallStream { tx, pending })
}

impl GrpcLink {
    /// The open stream, or a new one if there is none or it broke.
    async fn stream(
        slot: &Mutex<Option<CallStream>>,
        client: ExpertServiceClient<Channel>,
        worker: WorkerId,
        addr: &str,
    ) -> Result<CallStream, RouterError> {
        let open = slot
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .filter(|s| !s.tx.is_closed());
        if let Some(s) = open {
            return Ok(s);
        }
        let fresh = open_stream(client, worker, addr.to_string()).await?;
        if let Ok(mut s) = slot.lock() {
            // Another call may have opened one meanwhile: keep whichever is there and live.
            match s.as_ref().filter(|s| !s.tx.is_closed()) {
                Some(existing) => return Ok(existing.clone()),
                None => *s = Some(fresh.clone()),
            }
        }
        Ok(fresh)
    }
}

impl WorkerLink for GrpcLink {
    fn worker(&self) -> WorkerId {
        self.worker
    }

    fn addr(&self) -> &str {
        &self.addr
    }

    fn forward(&self, mut request: ForwardRequest, deadline: Duration) -> ForwardFuture {
        let (worker, addr, mut client) = (self.worker, self.addr.clone(), self.client.clone());
        let layer = request.layer as usize;
        // The stream's errors do not know the layer; name it here.
        let with_layer = move |e: RouterError| match e {
            RouterError::Worker {
                worker,
                addr,
                code,
                message,
                ..
            } => RouterError::Worker {
                worker,
                addr,
                layer,
                code,
                message,
            },
            e => e,
        };
        match &self.stream {
            Some(slot) => {
                let call_id = self.next_call.fetch_add(1, Ordering::Relaxed);
                let slot = slot.clone();
                Box::pin(async move {
                    let stream = GrpcLink::stream(&slot, client, worker, &addr)
                        .await
                        .map_err(with_layer)?;
                    request.call_id = call_id;
                    let (tx, rx) = oneshot::channel();
                    if let Ok(mut pending) = stream.pending.lock() {
                        pending.insert(call_id, tx);
                    }
                    if stream.tx.send(request).await.is_err() {
                        return Err(call_failed(
                            worker,
                            &addr,
                            layer,
                            tonic::Code::Unavailable,
                            "the call stream is closed",
                        ));
                    }
                    match tokio::time::timeout(deadline, rx).await {
                        Ok(Ok(result)) => result.map_err(with_layer),
                        Ok(Err(_)) => Err(call_failed(
                            worker,
                            &addr,
                            layer,
                            tonic::Code::Unavailable,
                            "the call stream ended",
                        )),
                        Err(_) => {
                            if let Ok(mut pending) = stream.pending.lock() {
                                pending.remove(&call_id);
                            }
                            Err(call_failed(
                                worker,
                                &addr,
                                layer,
                                tonic::Code::DeadlineExceeded,
                                format!("no reply within {deadline:?}"),
                            ))
                        }
                    }
                })
            }
            None => Box::pin(async move {
                let mut req = tonic::Request::new(request);
                req.set_timeout(deadline);
                let reply = client
                    .forward(req)
                    .await
                    .map_err(|s| call_failed(worker, &addr, layer, call_code(&s), s.message()))?;
                reply_of(reply.into_inner()).ok_or_else(|| {
                    call_failed(
                        worker,
                        &addr,
                        layer,
                        tonic::Code::Internal,
                        "reply without output",
                    )
                })
            }),
        }
    }

    fn info(&self, deadline: Duration) -> InfoFuture {
        let (worker, addr, mut client) = (self.worker, self.addr.clone(), self.client.clone());
        Box::pin(async move {
            let mut req = tonic::Request::new(InfoRequest {});
            req.set_timeout(deadline);
            client
                .info(req)
                .await
                .map(|r| r.into_inner())
                .map_err(|s| RouterError::Connect {
                    worker,
                    addr,
                    reason: format!("Info failed: {s}"),
                })
        })
    }
}

/// A worker's reply, `None` without output.
fn reply_of(r: ForwardResponse) -> Option<WorkerReply> {
    Some(WorkerReply {
        output: r.output?,
        queue_seconds: r.queue_seconds,
        compute_seconds: r.compute_seconds,
    })
}

/// The code a failed expert call counts as. tonic reports a connection that broke mid-call (a
/// worker killed or restarted: a reset stream, a GOAWAY) as `Internal` with an
/// `h2 protocol error` or `transport error` message; that is the worker being gone, which a
/// replica can fix, so it counts as `Unavailable`. Expert calls are pure, so retrying them is
/// safe.
fn call_code(status: &tonic::Status) -> tonic::Code {
    let message = status.message();
    match status.code() {
        tonic::Code::Internal | tonic::Code::Unknown
            if message.starts_with("h2 protocol error")
                || message.starts_with("transport error") =>
        {
            tonic::Code::Unavailable
        }
        // hyper's "connection closed" under a call in flight (the worker stopped), which
        // tonic reports as CANCELLED: the worker is gone, not the call given up.
        tonic::Code::Cancelled if message.starts_with("operation was canceled") => {
            tonic::Code::Unavailable
        }
        code => code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_that_broke_mid_call_counts_as_unavailable() {
        let broken = tonic::Status::internal("h2 protocol error: http2 error");
        assert_eq!(call_code(&broken), tonic::Code::Unavailable);
        let transport = tonic::Status::unknown("transport error");
        assert_eq!(call_code(&transport), tonic::Code::Unavailable);
        let closed = tonic::Status::cancelled("operation was canceled");
        assert_eq!(call_code(&closed), tonic::Code::Unavailable);
        // A worker's own internal error is not a lost connection.
        let bug = tonic::Status::internal("expert 3 failed: shape error");
        assert_eq!(call_code(&bug), tonic::Code::Internal);
        let bad = tonic::Status::invalid_argument("hidden size");
        assert_eq!(call_code(&bad), tonic::Code::InvalidArgument);
    }
}
