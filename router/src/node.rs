//! One way to assemble a router node — model, expert pool, scheduler, client APIs — used by
//! `switchyard router`, `generate`, `bench` and the tests alike.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use switchyard_engine::checkpoint::WeightFormat;
use switchyard_engine::model::{CausalLm, ExpertSelection, LoadOptions};
use switchyard_engine::tensor::Compute;
use switchyard_engine::tokenizer::TextTokenizer;
use tokio::net::TcpListener;

use crate::backend::ModelBackend;
use crate::error::RouterError;
use crate::experts::{DispatchOptions, ExpertPool};
use crate::server::{ServingOptions, ServingState};

/// Where a router node's routed experts run.
#[derive(Debug, Clone)]
pub enum Experts {
    /// In this process: the model holds its routed experts (or has none).
    InProcess,
    /// A fixed list of expert workers (static `--workers` mode).
    Workers(Vec<String>),
    /// The workers a coordinator's live placement names, followed as it changes; `wait` bounds
    /// the wait for a first live placement.
    Coordinator { addr: String, wait: Duration },
    /// A pool built elsewhere (another transport, a test).
    Pool(Arc<ExpertPool>),
}

impl Experts {
    fn loads_routed_experts(&self) -> bool {
        matches!(self, Experts::InProcess)
    }
}

/// A router node, its scheduler running; [`RouterNode::serve`] puts the APIs on sockets.
#[derive(Debug)]
pub struct RouterNode {
    model: Arc<CausalLm>,
    pool: Option<Arc<ExpertPool>>,
    state: ServingState,
}

impl RouterNode {
    /// Loads the checkpoint in `dir` — without its routed experts unless they run in this
    /// process — onto `compute`, with its tokenizer, and starts the node.
    pub fn load(
        dir: &Path,
        compute: &Compute,
        experts: Experts,
        weights: WeightFormat,
        dispatch: DispatchOptions,
        serving: &ServingOptions,
    ) -> Result<RouterNode, RouterError> {
        let selection = if experts.loads_routed_experts() {
            ExpertSelection::All
        } else {
            ExpertSelection::None
        };
        let mut model = CausalLm::load(
            dir,
            &LoadOptions {
                experts: selection,
                weights,
            },
        )?;
        model.offload(compute)?;
        let tokenizer = TextTokenizer::from_dir(dir)?.map(Arc::new);
        RouterNode::start(model, tokenizer, experts, dispatch, serving)
    }

    /// Starts a node over a loaded `model` (loaded with its routed experts for
    /// [`Experts::InProcess`], without them otherwise). The dispatch metrics are the serving
    /// metrics' own.
    pub fn start(
        model: CausalLm,
        tokenizer: Option<Arc<TextTokenizer>>,
        experts: Experts,
        dispatch: DispatchOptions,
        serving: &ServingOptions,
    ) -> Result<RouterNode, RouterError> {
        let config = model.config().clone();
        let dispatch = DispatchOptions {
            metrics: serving.metrics.dispatch.clone(),
            ..dispatch
        };
        let dense = config.moe.is_none();
        let pool = match experts {
            Experts::InProcess => None,
            _ if dense => {
                return Err(RouterError::invalid(
                    "workers",
                    "the model has no routed experts: the router runs it whole, with no expert workers or coordinator",
                ));
            }
            Experts::Workers(addrs) if addrs.is_empty() => {
                return Err(RouterError::invalid(
                    "workers",
                    "the model has routed experts: give expert workers or a coordinator",
                ));
            }
            Experts::Workers(addrs) => Some(ExpertPool::connect_static(&config, &addrs, dispatch)?),
            Experts::Coordinator { addr, wait } => {
                Some(ExpertPool::coordinated(&config, &addr, dispatch, wait)?)
            }
            Experts::Pool(pool) => Some(pool),
        };
        let model = Arc::new(model);
        let backend = Arc::new(match &pool {
            Some(pool) => ModelBackend::remote(model.clone(), pool.clone()),
            None => ModelBackend::local(model.clone()),
        });
        let state = ServingState::start(backend, Arc::new(config), tokenizer, serving)?;
        Ok(RouterNode { model, pool, state })
    }

    pub fn model(&self) -> &Arc<CausalLm> {
        &self.model
    }

    /// The expert pool, when the routed experts run on workers.
    pub fn pool(&self) -> Option<&Arc<ExpertPool>> {
        self.pool.as_ref()
    }

    /// What the client APIs share: the scheduler, the tokenizer, limits, metrics.
    pub fn state(&self) -> &ServingState {
        &self.state
    }

    /// Serves gRPC on `grpc` and, with `http`, the OpenAI-compatible API, until `shutdown`
    /// resolves: then both turn NOT_SERVING (503 on `/health`), stop taking new requests and
    /// finish the ones in flight.
    pub async fn serve(
        &self,
        grpc: TcpListener,
        http: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RouterError> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let draining = self.state.clone();
        tokio::spawn(async move {
            shutdown.await;
            draining.start_draining();
            let _ = stop.send(true);
        });
        let until = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|&s| s).await;
        };
        let grpc = crate::server::serve(self.state.clone(), grpc, until(stopped.clone()));
        let served = match http {
            Some(l) => {
                let http = crate::http::serve(self.state.clone(), l, until(stopped));
                let (a, b) = tokio::join!(grpc, http);
                a.and(b)
            }
            None => grpc.await,
        };
        if let Some(pool) = &self.pool {
            pool.leave().await;
        }
        served
    }
}
