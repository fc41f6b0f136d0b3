//! Remote experts over gRPC, ready to plug into the engine: connect to the workers, check they
//! serve this model, build the placement, and dispatch.

use std::future::Future;
use std::sync::Arc;

use switchyard_engine::model::{ExpertExecutor, Routing};
use switchyard_engine::{ModelConfig, Tensor};

use crate::dispatch::{DispatchOptions, Dispatcher, WorkerId};
use crate::error::RouterError;
use crate::grpc::GrpcTransport;
use crate::placement::Placement;

/// A pool of expert workers and the runtime that drives their connections.
pub struct RemoteExperts {
    dispatcher: Dispatcher,
    workers: Vec<WorkerId>,
    // Dropped last: the dispatcher's connections live on it.
    _runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for RemoteExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteExperts")
            .field("workers", &self.workers)
            .finish()
    }
}

/// Runs `fut` on `runtime` and waits for it from this (non-async) thread.
fn wait_on<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    fut: impl Future<Output = T> + Send + 'static,
) -> Result<T, RouterError> {
    let (tx, rx) = std::sync::mpsc::channel();
    runtime.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv()
        .map_err(|_| RouterError::Runtime("the dispatch runtime stopped".into()))
}

impl RemoteExperts {
    /// Connects to `addrs` (worker `i` is `WorkerId(i)`), checks each serves `config`'s model,
    /// and places every routed expert. Call from a plain thread, not from async code.
    pub fn connect(
        config: &ModelConfig,
        addrs: &[String],
        options: DispatchOptions,
    ) -> Result<RemoteExperts, RouterError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("switchyard-dispatch")
            .enable_all()
            .build()
            .map_err(|e| RouterError::Runtime(format!("cannot start the dispatch runtime: {e}")))?;
        let (addrs_owned, deadline, max, mode) = (
            addrs.to_vec(),
            options.deadline,
            options.max_message_bytes,
            options.call_mode,
        );
        let (transport, infos) = wait_on(&runtime, async move {
            let transport = GrpcTransport::connect(&addrs_owned, deadline, max, mode).await?;
            let infos = transport.infos().await?;
            Ok::<_, RouterError>((transport, infos))
        })??;
        let identity = config.identity();
        for (id, info) in &infos {
            if info.model != identity || info.hidden_size as usize != config.hidden_size {
                return Err(RouterError::Placement(format!(
                    "worker {id} ({}) serves model {:?}, this router {identity:?}",
                    addrs[id.0 as usize], info.model
                )));
            }
        }
        if options.shared_on_workers {
            for (id, info) in &infos {
                if let Some(l) = info
                    .layers
                    .iter()
                    .find(|l| !info.shared_expert_layers.contains(&l.layer))
                {
                    return Err(RouterError::Placement(format!(
                        "shared experts run on the workers, but worker {id} ({}) lacks the shared expert of layer {} (start it with --with-shared-expert)",
                        addrs[id.0 as usize], l.layer
                    )));
                }
            }
        }
        let placement = Placement::from_workers(config, &infos)?;
        let workers = transport.worker_ids();
        let dispatcher = Dispatcher::new(
            placement,
            Arc::new(transport),
            runtime.handle().clone(),
            config.hidden_size,
            &workers,
            options,
        );
        Ok(RemoteExperts {
            dispatcher,
            workers,
            _runtime: runtime,
        })
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    pub fn workers(&self) -> &[WorkerId] {
        &self.workers
    }
}

impl ExpertExecutor for RemoteExperts {
    fn run(
        &self,
        layer: usize,
        x: &Tensor,
        routing: &Routing,
    ) -> switchyard_engine::Result<Tensor> {
        self.dispatcher.run(layer, x, routing)
    }

    fn run_overlapped(
        &self,
        layer: usize,
        x: &Tensor,
        routing: &Routing,
        meanwhile: &mut dyn FnMut() -> switchyard_engine::Result<()>,
    ) -> switchyard_engine::Result<Tensor> {
        self.dispatcher.run_overlapped(layer, x, routing, meanwhile)
    }

    fn runs_shared_experts(&self) -> bool {
        self.dispatcher.runs_shared_experts()
    }
}
