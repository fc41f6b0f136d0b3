//! How expert calls reach workers: a [`Transport`] makes a [`WorkerLink`] per worker, and the
//! pool sends each call on the link of the worker it is for. gRPC in production
//! ([`super::grpc`]); [`MemoryTransport`] runs calls on in-process workers, with faults to
//! inject, so dispatch, retries, failover and placement switches test without sockets.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_proto::WorkerId;
use switchyard_proto::v1::{self, ForwardRequest, InfoResponse};

use crate::error::RouterError;

pub type ForwardFuture = Pin<Box<dyn Future<Output = Result<WorkerReply, RouterError>> + Send>>;
pub type InfoFuture = Pin<Box<dyn Future<Output = Result<InfoResponse, RouterError>> + Send>>;

/// A worker's answer to one call: the combined rows, and where the call's time went there.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerReply {
    /// `[rows, hidden]`
    pub output: v1::Tensor,
    /// From the call's arrival to the start of its compute.
    pub queue_seconds: f64,
    pub compute_seconds: f64,
}

impl WorkerReply {
    /// The worker's share of a round trip.
    pub fn worker_seconds(&self) -> f64 {
        self.queue_seconds + self.compute_seconds
    }
}

/// A connection to one worker. Calls on it are independent; it heals itself (a broken
/// connection or stream is re-opened by the next call).
pub trait WorkerLink: Send + Sync + fmt::Debug {
    fn worker(&self) -> WorkerId;
    fn addr(&self) -> &str;
    /// One expert call. The pool bounds it by the call deadline; a link may pass the
    /// deadline on to the worker too.
    fn forward(&self, request: ForwardRequest, deadline: Duration) -> ForwardFuture;
    /// What the worker holds and serves.
    fn info(&self, deadline: Duration) -> InfoFuture;
}

/// Makes links. Called inside the pool's runtime; connecting is lazy, so an unreachable
/// worker is not an error here — its calls fail (and are retried elsewhere) instead.
pub trait Transport: Send + Sync + fmt::Debug {
    fn connect(&self, worker: WorkerId, addr: &str) -> Result<Arc<dyn WorkerLink>, RouterError>;
}

/// The error for a failed call on `worker`.
pub fn call_failed(
    worker: WorkerId,
    addr: &str,
    layer: usize,
    code: tonic::Code,
    message: impl Into<String>,
) -> RouterError {
    RouterError::Worker {
        worker,
        addr: addr.to_string(),
        layer,
        code,
        message: message.into(),
    }
}

/// An expert worker in this process, as the memory transport calls it.
pub trait LocalWorker: Send + Sync {
    fn forward(&self, request: &ForwardRequest) -> Result<v1::Tensor, tonic::Status>;
    fn info(&self) -> InfoResponse;
}

/// A fault the memory transport injects into every call to one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Calls fail at once with this code.
    Fail(tonic::Code),
    /// Calls wait this long, then run.
    Delay(Duration),
    /// Calls never answer (a stopped process): the deadline ends them.
    Hang,
}

#[derive(Default)]
struct Net {
    workers: HashMap<String, Arc<dyn LocalWorker>>,
    faults: HashMap<String, Fault>,
    calls: HashMap<String, u64>,
}

/// In-process workers by address: "starting" one at an address is [`MemoryTransport::serve`],
/// "killing" it [`MemoryTransport::stop`] (calls then fail UNAVAILABLE, as a refused
/// connection does), restarting it `serve` again at the same address.
#[derive(Clone, Default)]
pub struct MemoryTransport {
    net: Arc<Mutex<Net>>,
}

impl fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let net = self.net.lock().unwrap_or_else(|e| e.into_inner());
        let mut addrs: Vec<_> = net.workers.keys().collect();
        addrs.sort();
        f.debug_struct("MemoryTransport")
            .field("workers", &addrs)
            .finish()
    }
}

impl MemoryTransport {
    pub fn new() -> MemoryTransport {
        MemoryTransport::default()
    }

    fn net(&self) -> std::sync::MutexGuard<'_, Net> {
        self.net.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts `worker` at `addr` (replacing whatever was there).
    pub fn serve(&self, addr: &str, worker: Arc<dyn LocalWorker>) {
        self.net().workers.insert(addr.to_string(), worker);
    }

    /// Takes the worker at `addr` away.
    pub fn stop(&self, addr: &str) {
        self.net().workers.remove(addr);
    }

    /// Injects `fault` into calls to `addr` (`None` clears it).
    pub fn set_fault(&self, addr: &str, fault: Option<Fault>) {
        let mut net = self.net();
        match fault {
            Some(f) => net.faults.insert(addr.to_string(), f),
            None => net.faults.remove(addr),
        };
    }

    /// Expert calls that reached `addr` (answered or not; probes are not counted).
    pub fn calls(&self, addr: &str) -> u64 {
        self.net().calls.get(addr).copied().unwrap_or(0)
    }
}

impl Transport for MemoryTransport {
    fn connect(&self, worker: WorkerId, addr: &str) -> Result<Arc<dyn WorkerLink>, RouterError> {
        Ok(Arc::new(MemoryLink {
            worker,
            addr: addr.to_string(),
            net: self.net.clone(),
        }))
    }
}

struct MemoryLink {
    worker: WorkerId,
    addr: String,
    net: Arc<Mutex<Net>>,
}

impl fmt::Debug for MemoryLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemoryLink({} at {})", self.worker, self.addr)
    }
}

impl MemoryLink {
    /// The worker at this address now and the fault to inject, counting the call if it is
    /// an expert call.
    fn reach(&self, count: bool) -> (Option<Arc<dyn LocalWorker>>, Option<Fault>) {
        let mut net = self.net.lock().unwrap_or_else(|e| e.into_inner());
        if count {
            *net.calls.entry(self.addr.clone()).or_default() += 1;
        }
        (
            net.workers.get(&self.addr).cloned(),
            net.faults.get(&self.addr).copied(),
        )
    }
}

impl WorkerLink for MemoryLink {
    fn worker(&self) -> WorkerId {
        self.worker
    }

    fn addr(&self) -> &str {
        &self.addr
    }

    fn forward(&self, request: ForwardRequest, _deadline: Duration) -> ForwardFuture {
        let (target, fault) = self.reach(true);
        let (worker, addr) = (self.worker, self.addr.clone());
        Box::pin(async move {
            let layer = request.layer as usize;
            match fault {
                Some(Fault::Fail(code)) => {
                    return Err(call_failed(worker, &addr, layer, code, "injected fault"));
                }
                Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
                Some(Fault::Hang) => std::future::pending::<()>().await,
                None => {}
            }
            let Some(target) = target else {
                return Err(call_failed(
                    worker,
                    &addr,
                    layer,
                    tonic::Code::Unavailable,
                    "connection refused: no worker at this address",
                ));
            };
            // Compute off the async threads, as a real worker does.
            let arrived = std::time::Instant::now();
            let (output, queued, computed) = tokio::task::spawn_blocking(move || {
                let queued = arrived.elapsed();
                let start = std::time::Instant::now();
                let out = target.forward(&request);
                (out, queued, start.elapsed())
            })
            .await
            .map_err(|e| call_failed(worker, &addr, layer, tonic::Code::Internal, e.to_string()))?;
            let output =
                output.map_err(|s| call_failed(worker, &addr, layer, s.code(), s.message()))?;
            Ok(WorkerReply {
                output,
                queue_seconds: queued.as_secs_f64(),
                compute_seconds: computed.as_secs_f64(),
            })
        })
    }

    /// Faults apply here too: a stopped process answers no probe either.
    fn info(&self, _deadline: Duration) -> InfoFuture {
        let (target, fault) = self.reach(false);
        let (worker, addr) = (self.worker, self.addr.clone());
        Box::pin(async move {
            match fault {
                Some(Fault::Fail(code)) => {
                    return Err(call_failed(worker, &addr, 0, code, "injected fault"));
                }
                Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
                Some(Fault::Hang) => std::future::pending::<()>().await,
                None => {}
            }
            target
                .map(|t| t.info())
                .ok_or_else(|| RouterError::Connect {
                    worker,
                    addr,
                    reason: "connection refused: no worker at this address".into(),
                })
        })
    }
}
