//! The serving API end to end: a router (scheduler + gRPC + HTTP) over in-process expert
//! workers, all on loopback ephemeral ports, driven by real clients (tonic, reqwest).

// Test helpers panic on failure by design: that is how a test fails.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use switchyard_engine::model::{CausalLm, ExpertSelection, LoadOptions};
use switchyard_engine::synth::{self, SynthDType, SynthOptions};
use switchyard_engine::tokenizer::TextTokenizer;
use switchyard_proto::v1::inference_service_client::InferenceServiceClient;
use switchyard_proto::v1::{GenerateRequest, ModelInfoRequest, TokenizeRequest};
use switchyard_router::experts::DispatchOptions;
use switchyard_router::node::{Experts, RouterNode};
use switchyard_router::server::{ServingOptions, ServingState};
use switchyard_tests::Sandbox;
use tokio::sync::oneshot;

fn tiny_f32(dir: &Path) {
    synth::synth(
        dir,
        &SynthOptions {
            preset: "tiny".into(),
            dtype: SynthDType::F32,
            seed: 5,
            ..Default::default()
        },
    )
    .unwrap();
}

fn options() -> ServingOptions {
    ServingOptions {
        model_name: "tiny".into(),
        metrics_auth: false,
        api_tls: None,
        api_key: None,
        kv_cache_bytes: 64 << 20,
        block_size: 16,
        max_batch_size: 32,
        max_batch_tokens: 256,
        max_waiting: 256,
        step_retry: switchyard_router::server::DEFAULT_STEP_RETRY,
        default_max_tokens: 32,
        max_model_len: None,
        metrics: switchyard_router::metrics::RouterMetrics::new(),
    }
}

/// A router serving gRPC and HTTP over two in-process workers.
struct Served {
    sandbox: Sandbox,
    _node: RouterNode,
    state: ServingState,
    grpc: String,
    http: String,
    stop: Vec<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Served {
    fn start(adjust: impl Fn(&mut ServingOptions)) -> Served {
        let dir = tempfile::tempdir().unwrap();
        tiny_f32(dir.path());
        let sandbox = Sandbox::start(dir.path(), &["0-7", "8-15"]);
        let model = CausalLm::load(
            dir.path(),
            &LoadOptions {
                experts: ExpertSelection::None,
                ..Default::default()
            },
        )
        .unwrap();
        let mut o = options();
        adjust(&mut o);
        let tokenizer = TextTokenizer::from_dir(dir.path()).unwrap().map(Arc::new);
        assert!(tokenizer.is_some(), "synth writes a tokenizer");
        let node = RouterNode::start(
            model,
            tokenizer,
            Experts::Workers(sandbox.addrs()),
            DispatchOptions::default(),
            &o,
        )
        .unwrap();
        let state = node.state().clone();
        let (grpc_l, http_l) = sandbox.block_on(async {
            (
                tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
                tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            )
        });
        let grpc = grpc_l.local_addr().unwrap().to_string();
        let http = http_l.local_addr().unwrap().to_string();
        let (tx1, rx1) = oneshot::channel::<()>();
        let (tx2, rx2) = oneshot::channel::<()>();
        let s1 = state.clone();
        let s2 = state.clone();
        sandbox.block_on(async {
            tokio::spawn(switchyard_router::server::serve(s1, grpc_l, async {
                let _ = rx1.await;
            }));
            tokio::spawn(switchyard_router::http::serve(s2, http_l, async {
                let _ = rx2.await;
            }));
        });
        Served {
            sandbox,
            _node: node,
            state,
            grpc,
            http,
            stop: vec![tx1, tx2],
            _dir: dir,
        }
    }

    async fn client(&self) -> InferenceServiceClient<tonic::transport::Channel> {
        InferenceServiceClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// Waits (bounded) until nothing runs and every KV block is back.
    fn wait_drained(&self) {
        let stats = self.state.scheduler.stats();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if stats.running.load(Ordering::Relaxed) == 0
                && stats.waiting.load(Ordering::Relaxed) == 0
                && stats.blocks_used.load(Ordering::Relaxed) == 0
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "not drained: running {} blocks {}",
            stats.running.load(Ordering::Relaxed),
            stats.blocks_used.load(Ordering::Relaxed)
        );
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        for tx in self.stop.drain(..) {
            let _ = tx.send(());
        }
    }
}

fn request(i: u32) -> GenerateRequest {
    // Prompts of 1..40 tokens, outputs of 3..20; odd ones sample with a seed.
    let len = 1 + (i * 7) % 40;
    GenerateRequest {
        prompt_ids: (0..len).map(|t| (t * 31 + i * 17) % 500 + 2).collect(),
        max_new_tokens: 3 + (i * 5) % 18,
        temperature: if i.is_multiple_of(2) { 0.0 } else { 0.8 },
        top_k: if i.is_multiple_of(2) { 0 } else { 40 },
        seed: Some(u64::from(i)),
        ignore_eos: true,
        ..Default::default()
    }
}

#[test]
fn concurrent_streams_match_one_at_a_time_runs() {
    let s = Served::start(|_| {});
    let n = 16;
    let alone: Vec<Vec<u32>> = s.sandbox.block_on(async {
        let mut c = s.client().await;
        let mut out = Vec::new();
        for i in 0..n {
            out.push(
                c.generate_unary(request(i))
                    .await
                    .unwrap()
                    .into_inner()
                    .token_ids,
            );
        }
        out
    });
    let together: Vec<Vec<u32>> = s.sandbox.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..n {
            let mut c = s.client().await;
            tasks.push(tokio::spawn(async move {
                let mut stream = c.generate(request(i)).await.unwrap().into_inner();
                let mut ids = Vec::new();
                let mut finished = false;
                while let Some(m) = stream.message().await.unwrap() {
                    if let Some(t) = m.token {
                        ids.push(t.id);
                    }
                    if !m.finish_reason.is_empty() {
                        assert_eq!(m.finish_reason, "length");
                        assert_eq!(m.usage.unwrap().completion_tokens as usize, ids.len());
                        finished = true;
                    }
                }
                assert!(finished, "a final message closes every stream");
                ids
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    for i in 0..n as usize {
        assert_eq!(together[i].len(), request(i as u32).max_new_tokens as usize);
        assert_eq!(together[i], alone[i], "request {i}");
    }
    s.wait_drained();
}

#[test]
fn a_dropped_stream_frees_its_sequence() {
    let s = Served::start(|_| {});
    s.sandbox.block_on(async {
        let mut c = s.client().await;
        let mut req = request(0);
        req.max_new_tokens = 3000;
        let mut stream = c.generate(req).await.unwrap().into_inner();
        for _ in 0..3 {
            assert!(stream.message().await.unwrap().unwrap().token.is_some());
        }
        assert!(
            s.state
                .scheduler
                .stats()
                .blocks_used
                .load(Ordering::Relaxed)
                > 0
        );
        drop(stream);
    });
    s.wait_drained();
    // An HTTP client that closes its server-sent-event stream does the same.
    s.sandbox.block_on(async {
        let mut r = reqwest::Client::new()
            .post(s.url("/v1/completions"))
            .json(&serde_json::json!({"prompt": "Hello", "max_tokens": 3000, "ignore_eos": true, "stream": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.chunk().await.unwrap().is_some());
        assert!(s.state.scheduler.stats().running.load(Ordering::Relaxed) > 0);
        drop(r);
    });
    s.wait_drained();
}

#[test]
fn tokenize_counts_tokens_and_model_info_describes_the_model() {
    let s = Served::start(|_| {});
    s.sandbox.block_on(async {
        let mut c = s.client().await;
        let count = |text: &str| {
            let mut c = c.clone();
            let text = text.to_string();
            async move {
                c.tokenize(TokenizeRequest {
                    text,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
            }
        };
        let tight = count("def f(x): return x+1").await;
        let spaced = count("def  f( x ) :\n\n    return   x + 1\n").await;
        assert_eq!(tight.count as usize, tight.ids.len());
        assert!(spaced.count > tight.count, "formatting costs tokens");
        assert_eq!(tight.tokens.concat(), "def f(x): return x+1");
        let info = c
            .model_info(ModelInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.model, "tiny");
        assert_eq!(info.vocab_size, 512);
        assert_eq!((info.num_routed_experts, info.experts_per_token), (16, 4));
        assert!(info.has_tokenizer && info.has_chat_template);
        assert!(info.kv_cache_blocks > 0);
        let bad = c
            .tokenize(TokenizeRequest {
                text: "x".into(),
                model: "other".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::NotFound);
    });
}

#[test]
fn grpc_errors_name_the_field_and_keep_the_server_up() {
    let s = Served::start(|_| {});
    s.sandbox.block_on(async {
        let mut c = s.client().await;
        let cases = [
            (
                GenerateRequest {
                    prompt_ids: vec![],
                    ..Default::default()
                },
                "prompt",
            ),
            (
                GenerateRequest {
                    prompt_ids: vec![1, 999],
                    ..Default::default()
                },
                "got 999",
            ),
            (
                GenerateRequest {
                    prompt_ids: vec![1],
                    temperature: -1.0,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                GenerateRequest {
                    prompt_ids: vec![1],
                    top_p: Some(0.0),
                    ..Default::default()
                },
                "top_p",
            ),
            (
                GenerateRequest {
                    prompt_ids: vec![1],
                    max_new_tokens: 5000,
                    ..Default::default()
                },
                "max_tokens",
            ),
            (
                GenerateRequest {
                    prompt_ids: vec![1],
                    stop: vec![String::new()],
                    ..Default::default()
                },
                "stop[0]",
            ),
        ];
        for (req, needle) in cases {
            let e = c.generate_unary(req.clone()).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{req:?}");
            assert!(e.message().contains(needle), "{}", e.message());
            // The stream form refuses the same way, before any message.
            let e = c.generate(req).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
        }
        let ok = c.generate_unary(request(2)).await.unwrap().into_inner();
        assert_eq!(ok.completion_tokens, request(2).max_new_tokens);
        // Each refusal is counted (twelve: six cases, unary and streamed).
        let metrics = s.state.render_metrics();
        assert!(
            metrics.contains("switchyard_requests_total{outcome=\"invalid\"} 12"),
            "{metrics}"
        );
    });
}

#[test]
fn text_prompts_stop_strings_and_logprobs() {
    let s = Served::start(|_| {});
    s.sandbox.block_on(async {
        let mut c = s.client().await;
        let base = GenerateRequest {
            prompt: "Hello there, experts".into(),
            max_new_tokens: 24,
            ignore_eos: true,
            logprobs: Some(3),
            ..Default::default()
        };
        let full = c.generate_unary(base.clone()).await.unwrap().into_inner();
        assert_eq!(full.tokens.len(), 24);
        for t in &full.tokens {
            let lp = t.logprob.unwrap();
            assert!(lp <= 0.0);
            assert_eq!(t.top_logprobs.len(), 3);
            // Greedy picks the most likely token.
            assert_eq!(t.top_logprobs[0].id, t.id);
            assert!((t.top_logprobs[0].logprob - lp).abs() < 1e-5);
        }
        // A stop string taken from the middle of the greedy text ends the output before it.
        let chars: Vec<char> = full.text.chars().collect();
        assert!(chars.len() >= 6, "{:?}", full.text);
        {
            let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
            let cut = full.text.find(&stop).unwrap();
            let stopped = c
                .generate_unary(GenerateRequest {
                    stop: vec![stop.clone()],
                    ..base.clone()
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(stopped.finish_reason, "stop");
            assert_eq!(stopped.text, full.text[..cut], "stop {stop:?}");
        }
    });
}

#[test]
fn logit_bias_bans_and_forces_tokens_over_grpc() {
    let s = Served::start(|_| {});
    s.sandbox.block_on(async {
        let mut c = s.client().await;
        let base = GenerateRequest {
            prompt_ids: vec![5, 9, 14],
            max_new_tokens: 6,
            ignore_eos: true,
            ..Default::default()
        };
        let greedy = c.generate_unary(base.clone()).await.unwrap().into_inner();
        let first = greedy.token_ids[0];
        let banned = c
            .generate_unary(GenerateRequest {
                logit_bias: [(first, -100.0)].into(),
                ..base.clone()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!banned.token_ids.contains(&first), "{banned:?}");
        let forced = c
            .generate_unary(GenerateRequest {
                logit_bias: [(46, 100.0)].into(),
                ..base.clone()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(forced.token_ids, [46; 6]);
        for (bias, says) in [((99_999, 1.0), "got 99999"), ((46, 250.0), "got 250")] {
            let e = c
                .generate_unary(GenerateRequest {
                    logit_bias: [bias].into(),
                    ..base.clone()
                })
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(
                e.message().contains("logit_bias") && e.message().contains(says),
                "{e}"
            );
        }
    });
    s.wait_drained();
}

#[test]
fn http_extras_tokenize_ids_bytes_and_json_errors_everywhere() {
    let s = Served::start(|_| {});
    s.sandbox.block_on(async {
        let http = reqwest::Client::new();
        let post = |path: &str, body: serde_json::Value| http.post(s.url(path)).json(&body).send();
        let json = |r: reqwest::Response| async move {
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        };
        // /tokenize and /detokenize round-trip; the chat form counts the template's tokens.
        let (st, t) = json(
            post(
                "/tokenize",
                serde_json::json!({"prompt": "Hello, experts", "return_token_strs": true}),
            )
            .await
            .unwrap(),
        )
        .await;
        assert_eq!(st, 200, "{t}");
        let ids: Vec<u32> = serde_json::from_value(t["tokens"].clone()).unwrap();
        assert_eq!(t["count"], ids.len());
        assert_eq!(t["token_strs"].as_array().unwrap().len(), ids.len());
        let (_, d) = json(
            post("/detokenize", serde_json::json!({"tokens": ids}))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(d["prompt"], "Hello, experts");
        let (_, chat) = json(
            post(
                "/tokenize",
                serde_json::json!({"messages": [{"role": "user", "content": "Hello, experts"}]}),
            )
            .await
            .unwrap(),
        )
        .await;
        assert!(chat["count"].as_u64().unwrap() > ids.len() as u64, "{chat}");
        let (st, e) = json(
            post("/detokenize", serde_json::json!({"tokens": [1, 70000]}))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            (st, e["error"]["param"].as_str()),
            (400, Some("tokens")),
            "{e}"
        );
        let (st, e) = json(
            post(
                "/tokenize",
                serde_json::json!({"prompt": "a", "messages": []}),
            )
            .await
            .unwrap(),
        )
        .await;
        assert_eq!(st, 400, "{e}");

        let (st, v) = json(http.get(s.url("/version")).send().await.unwrap()).await;
        assert_eq!(
            (st, v["version"].as_str()),
            (200, Some(env!("CARGO_PKG_VERSION")))
        );
        let (st, m) = json(http.get(s.url("/v1/models/tiny")).send().await.unwrap()).await;
        assert_eq!((st, m["id"].as_str()), (200, Some("tiny")));
        let (st, m) = json(http.get(s.url("/v1/models/gpt-4")).send().await.unwrap()).await;
        assert_eq!(
            (st, m["error"]["param"].as_str()),
            (404, Some("model")),
            "{m}"
        );

        // Unknown paths and methods: OpenAI-shaped JSON, never an empty body.
        let (st, e) = json(
            post("/v1/embeddings", serde_json::json!({"input": "x"}))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(st, 404);
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("/v1/embeddings"),
            "{e}"
        );
        let (st, e) = json(http.get(s.url("/v1/completions")).send().await.unwrap()).await;
        assert_eq!(st, 405);
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("GET /v1/completions"),
            "{e}"
        );

        // Ids are random, not sequential.
        let body = serde_json::json!({"prompt": "Hi", "max_tokens": 2, "temperature": 0});
        let (_, a) = json(post("/v1/completions", body.clone()).await.unwrap()).await;
        let (_, b) = json(post("/v1/completions", body).await.unwrap()).await;
        let (a, b) = (
            a["id"].as_str().unwrap().to_owned(),
            b["id"].as_str().unwrap().to_owned(),
        );
        assert_ne!(a, b);
        for id in [&a, &b] {
            let hex = id.strip_prefix("cmpl-").unwrap();
            assert!(
                hex.len() == 32 && hex.bytes().all(|c| c.is_ascii_hexdigit()),
                "{id}"
            );
        }

        // Chat logprobs' bytes are each token's own: they concatenate to the text. Special
        // tokens (the first ids) are banned so every token is text.
        let banned: serde_json::Map<String, serde_json::Value> = (0..16)
            .map(|i| (i.to_string(), serde_json::json!(-100)))
            .collect();
        let (st, c) = json(
            post(
                "/v1/chat/completions",
                serde_json::json!({
                    "messages": [{"role": "user", "content": "多 wörld"}], "max_tokens": 24,
                    "temperature": 0, "ignore_eos": true, "logprobs": true, "logit_bias": banned,
                }),
            )
            .await
            .unwrap(),
        )
        .await;
        assert_eq!(st, 200, "{c}");
        let mut bytes = Vec::new();
        for t in c["choices"][0]["logprobs"]["content"].as_array().unwrap() {
            bytes.extend(
                t["bytes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_u64().unwrap() as u8),
            );
        }
        // (Lossily: the text ends in U+FFFD where the output stops inside a character.)
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            c["choices"][0]["message"]["content"].as_str().unwrap()
        );

        // A field that would be dropped is refused by name instead.
        let (st, e) = json(
            post(
                "/v1/chat/completions",
                serde_json::json!({
                    "messages": [{"role": "user", "content": "x"}],
                    "response_format": {"type": "json_object"},
                }),
            )
            .await
            .unwrap(),
        )
        .await;
        assert_eq!(
            (st, e["error"]["param"].as_str()),
            (400, Some("response_format")),
            "{e}"
        );
    });
    s.wait_drained();
}

/// POSTs `len` bytes of JSON whitespace to `path` and returns the whole reply as text.
async fn oversized_post(addr: &str, path: &str, len: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let addr = addr.to_string();
    let (mut rx, mut tx) = stream.into_split();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {len}\r\nconnection: close\r\n\r\n"
    );
    let writer = tokio::spawn(async move {
        tx.write_all(head.as_bytes()).await?;
        tx.write_all(&vec![b' '; len]).await
    });
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), rx.read_to_end(&mut reply))
        .await
        .expect("no reply within 10 s")
        .unwrap();
    // The write may or may not finish before the server closes; either is fine.
    let _ = writer.await;
    String::from_utf8_lossy(&reply).into_owned()
}

fn sse_data(body: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for line in body.lines() {
        if let Some(d) = line.strip_prefix("data: ") {
            if d == "[DONE]" {
                return out;
            }
            out.push(serde_json::from_str(d).unwrap());
        }
    }
    panic!("no [DONE] in {body}");
}

#[test]
fn http_completions_chat_and_server_sent_events() {
    let s = Served::start(|_| {});
    s.sandbox.block_on(async {
        let http = reqwest::Client::new();
        let post = |path: &str, body: serde_json::Value| {
            http.post(s.url(path)).json(&body).send()
        };
        let r = post(
            "/v1/completions",
            serde_json::json!({"model": "tiny", "prompt": "Hello", "max_tokens": 6, "temperature": 0, "ignore_eos": true}),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 200);
        let j: serde_json::Value = r.json().await.unwrap();
        assert_eq!(j["object"], "text_completion");
        assert_eq!(j["usage"]["completion_tokens"], 6);
        assert_eq!(j["choices"][0]["finish_reason"], "length");
        let text = j["choices"][0]["text"].as_str().unwrap().to_string();

        // The same request streamed adds up to the same text.
        let r = post(
            "/v1/completions",
            serde_json::json!({"prompt": "Hello", "max_tokens": 6, "temperature": 0, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}}),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let chunks = sse_data(&r.text().await.unwrap());
        let streamed: String = chunks
            .iter()
            .filter_map(|c| c["choices"].get(0)?["text"].as_str())
            .collect();
        assert_eq!(streamed, text);
        assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 6);

        // Chat, plain and streamed.
        let chat = serde_json::json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}], "max_tokens": 8, "temperature": 0, "ignore_eos": true});
        let j: serde_json::Value = post("/v1/chat/completions", chat.clone())
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(j["object"], "chat.completion");
        assert_eq!(j["choices"][0]["message"]["role"], "assistant");
        let content = j["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        let mut streamed = chat.clone();
        streamed["stream"] = serde_json::json!(true);
        let r = post("/v1/chat/completions", streamed).await.unwrap();
        let chunks = sse_data(&r.text().await.unwrap());
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, content);
        assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");

        // Models, health, metrics.
        let m: serde_json::Value = http.get(s.url("/v1/models")).send().await.unwrap().json().await.unwrap();
        assert_eq!(m["data"][0]["id"], "tiny");
        assert_eq!(http.get(s.url("/health")).send().await.unwrap().status(), 200);
        let metrics = http.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
        assert!(metrics.contains("switchyard_kv_blocks_free"));

        // Errors: OpenAI-shaped, naming the field.
        for (path, body, status, param) in [
            ("/v1/completions", serde_json::json!({"prompt": "x", "temperature": -1}), 400, "temperature"),
            ("/v1/completions", serde_json::json!({"prompt": "x", "max_tokens": "many"}), 400, "max_tokens"),
            ("/v1/completions", serde_json::json!({"prompt": "x", "top_p": 2}), 400, "top_p"),
            // Type errors in the flattened sampling fields name the field, not `body`.
            ("/v1/completions", serde_json::json!({"prompt": "x", "temperature": "hot"}), 400, "temperature"),
            ("/v1/completions", serde_json::json!({"prompt": "x", "stop": 5}), 400, "stop"),
            ("/v1/completions", serde_json::json!({"prompt": "x", "seed": -1}), 400, "seed"),
            ("/v1/chat/completions", serde_json::json!({"messages": [{"role": "user", "content": "x"}], "top_k": 1.5}), 400, "top_k"),
            ("/v1/completions", serde_json::json!({"prompt": "x", "max_tokens": u64::MAX}), 400, "max_tokens"),
            ("/v1/completions", serde_json::json!({"prompt": ""}), 400, "prompt"),
            ("/v1/completions", serde_json::json!({"prompt": "x", "model": "gpt-4"}), 404, "model"),
            ("/v1/chat/completions", serde_json::json!({"messages": []}), 400, "messages"),
            ("/v1/chat/completions", serde_json::json!({"messages": [{"role": "robot", "content": "x"}]}), 400, "messages"),
        ] {
            let r = post(path, body.clone()).await.unwrap();
            assert_eq!(r.status().as_u16(), status, "{body}");
            let j: serde_json::Value = r.json().await.unwrap();
            assert_eq!(j["error"]["param"], param, "{body}: {j}");
            assert!(j["error"]["message"].as_str().unwrap().contains(param), "{j}");
        }
        let r = http
            .post(s.url("/v1/completions"))
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        // A body over the limit is refused with the same JSON error shape, naming the limit.
        // Over a raw socket, reading while writing: the server answers before the body ends
        // and closes, so an HTTP client's write of the rest may fail first.
        let reply = oversized_post(&s.http, "/v1/completions", 20 << 20).await;
        assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
        let json_at = reply.find("\r\n\r\n").map_or(0, |i| i + 4);
        let j: serde_json::Value = serde_json::from_str(&reply[json_at..]).unwrap();
        assert!(
            j["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&switchyard_router::http::MAX_BODY_BYTES.to_string()),
            "{j}"
        );
    });
    s.wait_drained();
}

#[test]
fn api_key_guards_the_client_apis_but_not_health() {
    let s = Served::start(|o| o.api_key = Some("sekret".into()));
    s.sandbox.block_on(async {
        let http = reqwest::Client::new();
        let r = http.get(s.url("/v1/models")).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let r = http
            .get(s.url("/v1/models"))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let r = http
            .get(s.url("/v1/models"))
            .bearer_auth("sekret")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            http.get(s.url("/health")).send().await.unwrap().status(),
            200
        );

        let mut c = s.client().await;
        let e = c.model_info(ModelInfoRequest {}).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let mut req = tonic::Request::new(ModelInfoRequest {});
        req.metadata_mut()
            .insert("authorization", "Bearer sekret".parse().unwrap());
        assert!(c.model_info(req).await.is_ok());
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", s.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "switchyard.v1.InferenceService".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.status, 1, "SERVING");
    });
}

#[test]
fn overload_is_refused_with_429_and_nothing_admitted_is_lost() {
    let s = Served::start(|o| {
        o.max_batch_size = 1;
        o.max_waiting = 2;
    });
    let results: Vec<(u16, Option<String>, serde_json::Value)> = s.sandbox.block_on(async {
        let http = reqwest::Client::new();
        let mut tasks = Vec::new();
        for i in 0..12 {
            let http = http.clone();
            let url = s.url("/v1/completions");
            tasks.push(tokio::spawn(async move {
                let r = http
                    .post(url)
                    .json(&serde_json::json!({"prompt": [1, 2, i + 3], "max_tokens": 40, "temperature": 0, "ignore_eos": true}))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let retry = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string());
                (status, retry, r.json().await.unwrap())
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    let served: Vec<_> = results.iter().filter(|r| r.0 == 200).collect();
    assert_eq!(refused.len() + served.len(), results.len(), "{results:?}");
    assert!(
        !refused.is_empty(),
        "twelve at once overflow a queue of two"
    );
    for (_, retry, body) in &refused {
        assert_eq!(retry.as_deref(), Some("1"));
        assert_eq!(body["error"]["type"], "rate_limit_error");
    }
    for (_, _, body) in &served {
        assert_eq!(body["usage"]["completion_tokens"], 40);
    }
    s.wait_drained();
}

#[test]
fn expert_load_counts_add_up_to_routed_tokens_times_top_k() {
    use switchyard_proto::v1::ExpertLoadRequest;
    let s = Served::start(|_| {});
    let load = s.sandbox.block_on(async {
        let mut c = s.client().await;
        // Start a clean window, then run requests with known token counts.
        c.expert_load(ExpertLoadRequest { reset: true })
            .await
            .unwrap();
        let mut fed = 0u64;
        for i in 0..6 {
            let req = request(i);
            let reply = c.generate_unary(req.clone()).await.unwrap().into_inner();
            // Every prompt token and every output token but the last went through the model.
            fed += u64::from(reply.prompt_tokens + reply.completion_tokens - 1);
        }
        let json = c
            .expert_load(ExpertLoadRequest { reset: false })
            .await
            .unwrap()
            .into_inner()
            .json;
        (
            fed,
            serde_json::from_str::<switchyard_router::expert_load::LoadSnapshot>(&json).unwrap(),
        )
    });
    let (fed, snapshot) = load;
    assert_eq!(snapshot.top_k, 4);
    assert_eq!(snapshot.layers.len(), 2, "tiny has two MoE layers");
    for l in &snapshot.layers {
        assert_eq!(l.tokens, fed, "layer {}", l.layer);
        assert_eq!(l.experts.iter().sum::<u64>(), fed * 4);
        // Worker 0 holds experts 0-7, worker 1 experts 8-15; static workers are named by
        // address.
        let addrs = s.sandbox.addrs();
        assert_eq!(l.workers[&addrs[0]], l.experts[..8].iter().sum::<u64>());
        assert_eq!(l.workers[&addrs[1]], l.experts[8..].iter().sum::<u64>());
        assert!(l.expert_imbalance.unwrap() >= 1.0);
        // Each worker's own Prometheus counter agrees with what the router sent it.
        for (i, w) in s.sandbox.workers.iter().enumerate() {
            let text = w.worker.metrics.render();
            let line = format!(
                "switchyard_worker_tokens_total{{layer=\"{}\"}} {}",
                l.layer, l.workers[&addrs[i]]
            );
            assert!(text.contains(&line), "{line} not in {text}");
        }
    }
    // The same over HTTP, and the imbalance gauges and outcome counters in /metrics.
    s.sandbox.block_on(async {
        let http = reqwest::Client::new();
        let metrics = http
            .get(s.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let j: serde_json::Value = http
            .get(s.url("/v1/expert_load?reset=true"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(j["layers"][0]["tokens"], fed);
        assert!(
            metrics.contains("switchyard_requests_total{outcome=\"length\"} 6"),
            "{metrics}"
        );
        assert!(metrics.contains("switchyard_expert_load_imbalance{layer=\"1\",over=\"expert\"}"));
        assert!(
            metrics.contains("switchyard_dispatch_layer_seconds_count{layer=\"1\"}"),
            "{metrics}"
        );
        assert!(metrics.contains("switchyard_step_phase_seconds_total{phase=\"experts\"}"));
        let after: serde_json::Value = http
            .get(s.url("/v1/expert_load"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            after["layers"][0]["tokens"], 0,
            "the reset started a new window"
        );
    });
}

#[test]
fn a_short_load_test_adds_up_over_grpc_and_http() {
    use switchyard_loadtest::workload::{Length, Workload};
    use switchyard_loadtest::{Arrivals, LoadtestConfig, Progress, RequestSettings, Stop, Target};
    let s = Served::start(|_| {});
    let config = |arrivals, stop| LoadtestConfig {
        arrivals,
        stop,
        warmup: 1,
        workload: Workload::Synthetic {
            prompt_len: Length::Uniform(4, 40),
            output_len: Length::Uniform(2, 12),
            vocab: 512,
        },
        settings: RequestSettings {
            temperature: 0.0,
            ignore_eos: true,
            timeout: Duration::from_secs(60),
            api_key: None,
        },
        seed: 3,
        max_in_flight: 64,
        top_experts: 3,
    };
    let runs = s.sandbox.block_on(async {
        let grpc = Target::grpc(&s.grpc).await.unwrap();
        let http = Target::http(&s.http).unwrap();
        let a = switchyard_loadtest::run(
            grpc,
            &config(Arrivals::Closed { concurrency: 4 }, Stop::Requests(24)),
            Arc::new(Progress::default()),
        )
        .await
        .unwrap();
        let b = switchyard_loadtest::run(
            http,
            &config(
                Arrivals::Open { rate: 50.0 },
                Stop::Duration(Duration::from_millis(400)),
            ),
            Arc::new(Progress::default()),
        )
        .await
        .unwrap();
        [a, b]
    });
    for report in &runs {
        assert_eq!(report.requests.failed, 0, "{:?}", report.requests.errors);
        assert!(report.requests.ok > 0);
        assert!(report.latency_ms.ttft.count > 0 && report.latency_ms.e2e.p50 > 0.0);
        // Every measured token went through each MoE layer once and chose top-k experts.
        let fed: u64 = report
            .per_request
            .iter()
            .map(|r| u64::from(r.prompt_tokens + r.output_tokens - 1))
            .sum();
        let u = report.expert_utilisation.as_ref().unwrap();
        assert_eq!(u.layers.len(), 2);
        for (l, counts) in u.layers.iter().zip(&u.counts) {
            assert_eq!(l.tokens, fed, "layer {}", l.layer);
            assert_eq!(counts.iter().sum::<u64>(), fed * u.top_k as u64);
        }
        let share: f64 = u.worker_share.values().sum();
        assert!((share - 1.0).abs() < 1e-9);
        // The report survives JSON, and the plots are written and not empty.
        let json = serde_json::to_string(report).unwrap();
        let back: switchyard_loadtest::Report = serde_json::from_str(&json).unwrap();
        // (floats may differ in the last digit through serde_json; the counts may not)
        assert_eq!(back.requests, report.requests);
        assert_eq!(back.per_request.len(), report.per_request.len());
        assert_eq!(
            back.expert_utilisation.map(|u| u.counts),
            Some(u.counts.clone())
        );
        let dir = tempfile::tempdir().unwrap();
        let files = switchyard_loadtest::plot::write_all(report, dir.path()).unwrap();
        assert_eq!(files.len(), 3);
        for f in files {
            let svg = std::fs::read_to_string(&f).unwrap();
            assert!(
                svg.starts_with("<svg") && svg.contains("<rect"),
                "{}",
                f.display()
            );
        }
        assert!(report.table().contains("expert utilisation"));
    }
    // The closed run sent exactly what it was asked to.
    assert_eq!(runs[0].requests.total, 24);
}
