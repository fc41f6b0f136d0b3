//! Authenticated cluster links: a coordinated cluster over mutual TLS serves exactly what a
//! plaintext one does, and refuses what the certificates do not allow — `Forward` from
//! anything but a router, a heartbeat, leave or registration for another worker's id or
//! address, any call from a certificate of another CA or from no certificate.

// Test helpers panic on failure by design: that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use switchyard_engine::ModelConfig;
use switchyard_engine::model::{CausalLm, ExpertExecutor, ExpertSelection, LoadOptions};
use switchyard_engine::synth::{self, SynthDType, SynthOptions};
use switchyard_proto::tls::{ClusterCa, ClusterLinks, NodeIdentity, Role};
use switchyard_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use switchyard_proto::v1::expert_service_client::ExpertServiceClient;
use switchyard_proto::v1::{
    Dtype, ForwardRequest, HeartbeatRequest, InfoRequest, LeaveRequest, RegisterRequest,
};
use switchyard_router::ExpertPool;
use switchyard_router::experts::DispatchOptions;
use switchyard_tests::Cluster;
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

const PROMPT: &[u32] = &[1, 17, 42, 99, 3, 250, 7];
const LIMIT: Duration = Duration::from_secs(20);

fn tiny() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    synth::synth(
        dir.path(),
        &SynthOptions {
            preset: "tiny".into(),
            dtype: SynthDType::F32,
            seed: 5,
            ..Default::default()
        },
    )
    .unwrap();
    dir
}

fn logits(model: &CausalLm, experts: &dyn ExpertExecutor) -> Vec<f32> {
    switchyard_tests::prompt_logits(model, experts, PROMPT)
}

/// Runs `f` on a runtime of its own, bounded by [`LIMIT`].
fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            tokio::time::timeout(LIMIT, f)
                .await
                .expect("within the limit")
        })
}

fn worker_client(
    addr: &str,
    links: &ClusterLinks,
) -> ExpertServiceClient<tonic::transport::Channel> {
    ExpertServiceClient::new(links.endpoint(addr, Role::Worker).unwrap().connect_lazy())
}

fn coordinator_client(
    addr: &str,
    links: &ClusterLinks,
) -> CoordinatorServiceClient<tonic::transport::Channel> {
    CoordinatorServiceClient::new(
        links
            .endpoint(addr, Role::Coordinator)
            .unwrap()
            .connect_lazy(),
    )
}

/// A TLS client that trusts the cluster CA but presents no certificate of its own.
fn anonymous(addr: &str, ca_pem: &str, server: Role) -> tonic::transport::Channel {
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca_pem))
                .domain_name(server.server_name()),
        )
        .unwrap()
        .connect_lazy()
}

/// A one-message request stream.
fn futures_iter(
    req: ForwardRequest,
) -> impl tonic::codegen::tokio_stream::Stream<Item = ForwardRequest> + Send + 'static {
    tonic::codegen::tokio_stream::iter(vec![req])
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("the call is refused").code()
}

#[test]
fn a_cluster_over_mutual_tls_serves_what_a_local_model_computes() {
    let dir = tiny();
    let config = ModelConfig::from_dir(dir.path()).unwrap();
    let local = CausalLm::load(dir.path(), &LoadOptions::default()).unwrap();
    let want = logits(&local, &local);
    let cluster = Cluster::start_tls(dir.path(), 1, Duration::from_millis(1000), 2);
    let pool = ExpertPool::coordinated(
        &config,
        cluster.coordinator_addr(),
        DispatchOptions {
            wire_dtype: Dtype::F32,
            links: cluster.links_for(&NodeIdentity::new(Role::Router, "router-0")),
            ..Default::default()
        },
        LIMIT,
    )
    .unwrap();
    let router = CausalLm::load(
        dir.path(),
        &LoadOptions {
            experts: ExpertSelection::None,
            ..Default::default()
        },
    )
    .unwrap();
    let got = logits(&router, &pool.step().unwrap());
    let diff = want
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-4, "logits differ by {diff}");
    // The router's reports reached the coordinator as a router's.
    let deadline = std::time::Instant::now() + LIMIT;
    while cluster.status().routers.is_empty() {
        assert!(std::time::Instant::now() < deadline, "no router report");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn workers_serve_hidden_states_only_to_routers() {
    let dir = tiny();
    let cluster = Cluster::start_tls(dir.path(), 1, Duration::from_millis(1000), 1);
    let addr = cluster.workers[0].addr.clone();
    let router = cluster.links_for(&NodeIdentity::new(Role::Router, "r"));
    let worker = cluster.links_for(&NodeIdentity::new(Role::Worker, "w-other"));
    let ca_pem = ca_of(&cluster);
    run(async {
        // A router's certificate: answered.
        let info = worker_client(&addr, &router)
            .info(InfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(!info.layers.is_empty());
        let forward = ForwardRequest {
            layer: info.layers[0].layer,
            ..Default::default()
        };
        // Another worker's certificate: PERMISSION_DENIED, on both call paths.
        let mut as_worker = worker_client(&addr, &worker);
        assert_eq!(
            code(as_worker.forward(forward.clone()).await),
            Code::PermissionDenied
        );
        assert_eq!(
            code(
                as_worker
                    .forward_stream(futures_iter(forward.clone()))
                    .await
            ),
            Code::PermissionDenied
        );
        // TLS without a certificate: UNAUTHENTICATED.
        let mut nobody = ExpertServiceClient::new(anonymous(&addr, &ca_pem, Role::Worker));
        let refused = nobody.forward(forward.clone()).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused}");
        assert!(
            refused.message().contains("client certificate"),
            "{refused}"
        );
        // Plaintext reaches no service at all.
        let mut plain = worker_client(&addr, &ClusterLinks::Insecure);
        assert_ne!(code(plain.info(InfoRequest {}).await), Code::Ok);
        // A certificate of another CA fails the handshake.
        let foreign = ClusterCa::generate(Duration::from_secs(600)).unwrap();
        let rogue = ClusterLinks::tls(
            foreign
                .node_tls(&NodeIdentity::new(Role::Router, "r"))
                .unwrap(),
        );
        assert_ne!(
            code(worker_client(&addr, &rogue).forward(forward).await),
            Code::Ok
        );
    });
}

/// The cluster CA's certificate, from a node's material as the harness issued it.
fn ca_of(cluster: &Cluster) -> String {
    match cluster.links_for(&NodeIdentity::new(Role::Admin, "probe")) {
        ClusterLinks::Tls(t) => String::from_utf8_lossy(t.ca_pem()).into_owned(),
        ClusterLinks::Insecure => unreachable!("a TLS cluster"),
    }
}

#[test]
fn the_coordinator_takes_a_worker_s_calls_only_from_its_certificate() {
    let dir = tiny();
    let cluster = Cluster::start_tls(dir.path(), 1, Duration::from_millis(1000), 2);
    let addr = cluster.coordinator_addr().to_string();
    let before = cluster.status();
    let victim = before.workers[0].clone();
    let model = ModelConfig::from_dir(dir.path()).unwrap().identity();
    let impostor = cluster.links_for(&NodeIdentity::new(Role::Worker, "worker-99"));
    let router = cluster.links_for(&NodeIdentity::new(Role::Router, "router-0"));
    let ca_pem = ca_of(&cluster);
    run(async {
        let mut c = coordinator_client(&addr, &impostor);
        // Heartbeat and leave for another worker's id.
        let hb = c
            .heartbeat(HeartbeatRequest {
                worker_id: victim.worker_id,
                loaded_version: u64::MAX,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(hb.code(), Code::PermissionDenied, "{hb}");
        assert!(hb.message().contains("worker-99"), "{hb}");
        let leave = LeaveRequest {
            worker_id: victim.worker_id,
            done: true,
        };
        assert_eq!(code(c.leave(leave).await), Code::PermissionDenied);
        // Registering at another worker's address (to take its calls).
        let register = RegisterRequest {
            address: victim.address.clone(),
            memory_bytes: 1 << 40,
            device: "cpu".into(),
            model: model.clone(),
            previous_worker_id: Some(victim.worker_id),
        };
        assert_eq!(
            code(c.register(register.clone()).await),
            Code::PermissionDenied
        );
        // A router's certificate may not join as a worker; no certificate may not either.
        let mut as_router = coordinator_client(&addr, &router);
        assert_eq!(
            code(as_router.register(register.clone()).await),
            Code::PermissionDenied
        );
        let mut nobody =
            CoordinatorServiceClient::new(anonymous(&addr, &ca_pem, Role::Coordinator));
        assert_eq!(
            code(nobody.register(register.clone()).await),
            Code::Unauthenticated
        );
        assert_eq!(code(nobody.leave(leave).await), Code::Unauthenticated);
        // Routers report; workers may not report as routers.
        assert_eq!(
            code(
                c.report_router(switchyard_proto::v1::RouterReport {
                    router_id: "fake".into(),
                    ..Default::default()
                })
                .await
            ),
            Code::PermissionDenied
        );
    });
    // Nothing changed: the same workers, the same live version.
    let after = cluster.status();
    assert_eq!(after.workers.len(), before.workers.len());
    assert_eq!(after.live_version, before.live_version);
    assert!(
        after
            .workers
            .iter()
            .any(|w| w.worker_id == victim.worker_id && w.address == victim.address)
    );
}
