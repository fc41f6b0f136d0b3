//! The gRPC [`Transport`]: one client per worker, TCP_NODELAY, a deadline on every call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_proto::v1::expert_service_client::ExpertServiceClient;
use switchyard_proto::v1::{self, ForwardRequest, InfoRequest, InfoResponse};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::dispatch::{ForwardFuture, Transport, WorkerId};
use crate::error::RouterError;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<v1::Tensor, RouterError>>>>>;

/// One long-lived `ForwardStream` to a worker: requests go in on `tx`, a reader task hands each
/// reply to the call waiting for its `call_id`.
#[derive(Clone, Debug)]
struct CallStream {
    tx: mpsc::Sender<ForwardRequest>,
    pending: Pending,
}

#[derive(Clone, Debug)]
struct Worker {
    addr: String,
    client: ExpertServiceClient<Channel>,
    stream: Option<CallStream>,
}

/// Clients for a fixed pool of workers, keyed by [`WorkerId`] (their index in the address list).
#[derive(Clone, Debug)]
pub struct GrpcTransport {
    workers: Vec<Worker>,
    deadline: Duration,
    next_call: Arc<AtomicU64>,
}

/// How calls travel: a unary RPC each, or one long-lived bidirectional stream per worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CallMode {
    #[default]
    Unary,
    Stream,
}

fn fail_all(pending: &Pending, worker: WorkerId, addr: &str, message: &str) {
    if let Ok(mut map) = pending.lock() {
        for (_, tx) in map.drain() {
            let _ = tx.send(Err(RouterError::Worker {
                worker,
                addr: addr.to_string(),
                layer: usize::MAX,
                code: tonic::Code::Unavailable,
                message: message.to_string(),
            }));
        }
    }
}

async fn open_stream(
    client: &mut ExpertServiceClient<Channel>,
    worker: WorkerId,
    addr: &str,
) -> Result<CallStream, RouterError> {
    let (tx, rx) = mpsc::channel::<ForwardRequest>(64);
    let replies = client
        .forward_stream(ReceiverStream::new(rx))
        .await
        .map_err(|s| RouterError::Connect {
            worker,
            addr: addr.to_string(),
            reason: format!("ForwardStream failed: {s}"),
        })?;
    let mut replies = replies.into_inner();
    let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
    let (reader_pending, addr) = (pending.clone(), addr.to_string());
    tokio::spawn(async move {
        loop {
            match replies.message().await {
                Ok(Some(reply)) => {
                    let waiter = reader_pending
                        .lock()
                        .ok()
                        .and_then(|mut m| m.remove(&reply.call_id));
                    if let Some(waiter) = waiter {
                        let result = if reply.error_code != 0 {
                            Err(RouterError::Worker {
                                worker,
                                addr: addr.clone(),
                                layer: usize::MAX,
                                code: tonic::Code::from(reply.error_code),
                                message: reply.error_message,
                            })
                        } else {
                            reply.output.ok_or_else(|| RouterError::Worker {
                                worker,
                                addr: addr.clone(),
                                layer: usize::MAX,
                                code: tonic::Code::Internal,
                                message: "reply without output".into(),
                            })
                        };
                        let _ = waiter.send(result);
                    }
                }
                Ok(None) => {
                    fail_all(
                        &reader_pending,
                        worker,
                        &addr,
                        "the worker closed the call stream",
                    );
                    break;
                }
                Err(status) => {
                    fail_all(
                        &reader_pending,
                        worker,
                        &addr,
                        &format!("call stream broke: {status}"),
                    );
                    break;
                }
            }
        }
    });
    Ok(CallStream { tx, pending })
}

fn url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

impl GrpcTransport {
    /// Connects to every worker (must run inside a tokio runtime, which then drives the
    /// connections).
    pub async fn connect(
        addrs: &[String],
        deadline: Duration,
        max_message_bytes: usize,
        mode: CallMode,
    ) -> Result<GrpcTransport, RouterError> {
        let mut workers = Vec::with_capacity(addrs.len());
        for (i, addr) in addrs.iter().enumerate() {
            let connect_error = |reason: String| RouterError::Connect {
                worker: WorkerId(i as u32),
                addr: addr.clone(),
                reason,
            };
            let channel = Endpoint::from_shared(url(addr))
                .map_err(|e| connect_error(e.to_string()))?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
                .map_err(|e| connect_error(e.to_string()))?;
            let mut client = ExpertServiceClient::new(channel)
                .max_decoding_message_size(max_message_bytes + (1 << 20))
                .max_encoding_message_size(max_message_bytes + (1 << 20));
            let stream = match mode {
                CallMode::Stream => Some(open_stream(&mut client, WorkerId(i as u32), addr).await?),
                CallMode::Unary => None,
            };
            workers.push(Worker {
                addr: addr.clone(),
                client,
                stream,
            });
        }
        Ok(GrpcTransport {
            workers,
            deadline,
            next_call: Arc::new(AtomicU64::new(1)),
        })
    }

    pub fn worker_ids(&self) -> Vec<WorkerId> {
        (0..self.workers.len() as u32).map(WorkerId).collect()
    }

    /// What each worker holds.
    pub async fn infos(&self) -> Result<Vec<(WorkerId, InfoResponse)>, RouterError> {
        let mut out = Vec::with_capacity(self.workers.len());
        for (i, w) in self.workers.iter().enumerate() {
            let mut req = tonic::Request::new(InfoRequest {});
            req.set_timeout(self.deadline);
            let info = w
                .client
                .clone()
                .info(req)
                .await
                .map_err(|s| RouterError::Connect {
                    worker: WorkerId(i as u32),
                    addr: w.addr.clone(),
                    reason: format!("Info failed: {s}"),
                })?;
            out.push((WorkerId(i as u32), info.into_inner()));
        }
        Ok(out)
    }
}

impl Transport for GrpcTransport {
    fn forward(&self, worker: WorkerId, mut request: ForwardRequest) -> ForwardFuture {
        let target = self.workers.get(worker.0 as usize).cloned();
        let deadline = self.deadline;
        let call_id = self.next_call.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            let layer = request.layer as usize;
            let Some(Worker {
                addr,
                mut client,
                stream,
            }) = target
            else {
                return Err(RouterError::Placement(format!(
                    "no worker {worker} in the pool"
                )));
            };
            let failed = |code: tonic::Code, message: String| RouterError::Worker {
                worker,
                addr: addr.clone(),
                layer,
                code,
                message,
            };
            // The stream's errors do not know the layer; name it here.
            let with_layer = |e: RouterError| match e {
                RouterError::Worker { code, message, .. } => failed(code, message),
                e => e,
            };
            if let Some(stream) = stream {
                request.call_id = call_id;
                let (tx, rx) = oneshot::channel();
                if let Ok(mut pending) = stream.pending.lock() {
                    pending.insert(call_id, tx);
                }
                if stream.tx.send(request).await.is_err() {
                    return Err(failed(
                        tonic::Code::Unavailable,
                        "the call stream is closed".into(),
                    ));
                }
                return match tokio::time::timeout(deadline, rx).await {
                    Ok(Ok(result)) => result.map_err(with_layer),
                    Ok(Err(_)) => Err(failed(
                        tonic::Code::Unavailable,
                        "the call stream ended".into(),
                    )),
                    Err(_) => {
                        if let Ok(mut pending) = stream.pending.lock() {
                            pending.remove(&call_id);
                        }
                        Err(failed(
                            tonic::Code::DeadlineExceeded,
                            format!("no reply within {deadline:?}"),
                        ))
                    }
                };
            }
            let mut req = tonic::Request::new(request);
            req.set_timeout(deadline);
            let reply = client
                .forward(req)
                .await
                .map_err(|s| failed(call_code(&s), s.message().to_string()))?;
            reply
                .into_inner()
                .output
                .ok_or_else(|| failed(tonic::Code::Internal, "reply without output".into()))
        })
    }
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
        // A worker's own internal error is not a lost connection.
        let bug = tonic::Status::internal("expert 3 failed: shape error");
        assert_eq!(call_code(&bug), tonic::Code::Internal);
        let bad = tonic::Status::invalid_argument("hidden size");
        assert_eq!(call_code(&bad), tonic::Code::InvalidArgument);
    }
}
