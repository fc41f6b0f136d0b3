//! Call planning, pure: one MoE layer's routing → one call per worker. Each worker gets the
//! hidden row of every token that chose any of its experts — once, however many of its
//! experts the token chose — with that token's `(expert, weight)` pairs for the worker; a
//! failed call's work can be taken back out ([`work_of`]) and planned again elsewhere.

use std::collections::{BTreeMap, BTreeSet};

use switchyard_engine::model::Routing;
use switchyard_proto::WorkerId;
use switchyard_proto::codec;
use switchyard_proto::v1::{Dtype, ForwardRequest};

use crate::error::RouterError;
use crate::experts::DispatchOptions;
use crate::experts::placement::Placement;

/// One worker's share of a layer: the batch rows it got, and the request carrying them.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerCall {
    pub worker: WorkerId,
    /// Batch row of each request row.
    pub rows: Vec<u32>,
    pub request: ForwardRequest,
}

/// Who serves a layer's (token, expert) pairs: `placement`'s holders, skipping `down` (workers
/// that just failed) unless every holder is down, taking turns by token row turned by `salt`.
#[derive(Clone, Copy, Debug)]
pub struct Serving<'a> {
    pub placement: &'a Placement,
    pub down: &'a BTreeSet<WorkerId>,
    pub salt: u64,
}

/// One token's routed work for a layer: its batch row, its `(expert, weight)` pairs, and
/// whether its shared expert travels with one of its calls.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenWork {
    pub row: u32,
    pub pairs: Vec<(u32, f32)>,
    pub shared: bool,
}

/// Splits one layer's routing into one call per worker (pure). Each (token, expert) goes to
/// the holder [`Placement::serving`] picks for the token's row, as `serving` says.
///
/// With `options.shared_on_workers`, each token's shared expert travels with one of its routed calls:
/// the worker, among those the token already visits, with the fewest shared rows so far.
pub fn plan_calls(
    layer: usize,
    x: &[f32],
    hidden: usize,
    routing: &Routing,
    serving: &Serving<'_>,
    options: &DispatchOptions,
) -> Result<Vec<WorkerCall>, RouterError> {
    let Serving {
        placement,
        down,
        salt,
    } = *serving;
    let work = (0..routing.tokens()).map(|t| TokenWork {
        row: t as u32,
        pairs: routing.token(t).collect(),
        shared: options.shared_on_workers,
    });
    build_calls(
        layer,
        x,
        hidden,
        work,
        &|row, e| {
            let token = u64::from(row) + salt;
            placement
                .serving(layer, e, token, down)
                .or_else(|| placement.serving(layer, e, token, &BTreeSet::new()))
        },
        options.wire_dtype,
    )
}

/// Groups tokens' work (in row order) into one call per worker, each token's row once per
/// worker; `worker_for(row, expert)` says who runs a token's expert.
pub fn build_calls(
    layer: usize,
    x: &[f32],
    hidden: usize,
    work: impl IntoIterator<Item = TokenWork>,
    worker_for: &dyn Fn(u32, u32) -> Option<WorkerId>,
    dtype: Dtype,
) -> Result<Vec<WorkerCall>, RouterError> {
    #[derive(Default)]
    struct Builder {
        rows: Vec<u32>,
        offsets: Vec<u32>,
        ids: Vec<u32>,
        weights: Vec<f32>,
        shared_rows: Vec<u32>,
    }
    let mut builders: BTreeMap<WorkerId, Builder> = BTreeMap::new();
    for token in work {
        let t = token.row;
        for (e, w) in token.pairs {
            let worker = worker_for(t, e).ok_or_else(|| {
                RouterError::Placement(format!("expert {e} of layer {layer} has no live worker"))
            })?;
            let b = builders.entry(worker).or_insert_with(|| Builder {
                offsets: vec![0],
                ..Default::default()
            });
            if b.rows.last() != Some(&t) {
                b.rows.push(t);
                b.offsets.push(b.ids.len() as u32);
            }
            b.ids.push(e);
            b.weights.push(w);
            if let Some(end) = b.offsets.last_mut() {
                *end = b.ids.len() as u32;
            }
        }
        if token.shared
            && let Some(b) = builders
                .values_mut()
                .filter(|b| b.rows.last() == Some(&t))
                .min_by_key(|b| b.shared_rows.len())
        {
            b.shared_rows.push(b.rows.len() as u32 - 1);
        }
    }
    Ok(builders
        .into_iter()
        .map(|(worker, b)| {
            WorkerCall {
                worker,
                request: ForwardRequest {
                    layer: layer as u32,
                    // Gathered straight into the wire bytes.
                    hidden: Some(codec::encode_rows(x, hidden, &b.rows, dtype)),
                    offsets: b.offsets,
                    expert_ids: b.ids,
                    weights: b.weights,
                    reply_dtype: dtype as i32,
                    shared_rows: b.shared_rows,
                    call_id: 0,
                },
                rows: b.rows,
            }
        })
        .collect())
}

/// The work a call carried, to send again elsewhere.
pub fn work_of(call: &WorkerCall) -> Vec<TokenWork> {
    let r = &call.request;
    call.rows
        .iter()
        .enumerate()
        .map(|(j, &row)| {
            let span = r.offsets[j] as usize..r.offsets[j + 1] as usize;
            TokenWork {
                row,
                pairs: r.expert_ids[span.clone()]
                    .iter()
                    .copied()
                    .zip(r.weights[span].iter().copied())
                    .collect(),
                shared: r.shared_rows.contains(&(j as u32)),
            }
        })
        .collect()
}

/// Failures another worker can fix, so the call is re-planned and sent once more: the worker
/// is gone or too slow (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, a failed connection), or it
/// no longer holds the expert because the placement moved on (FAILED_PRECONDITION). A
/// malformed request would fail anywhere, so it is not retried.
pub fn retryable(e: &RouterError) -> bool {
    match e {
        RouterError::Worker { code, .. } => matches!(
            code,
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::FailedPrecondition
        ),
        RouterError::Connect { .. } => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experts::placement::ExpertShape;

    fn opts(wire_dtype: Dtype, shared_on_workers: bool) -> DispatchOptions {
        DispatchOptions {
            wire_dtype,
            shared_on_workers,
            ..Default::default()
        }
    }
    use switchyard_proto::v1::{InfoResponse, LayerExperts};

    fn placement(split: &[(u32, std::ops::Range<u32>)]) -> Placement {
        let json = switchyard_engine::synth::preset_config("tiny").unwrap();
        let config = switchyard_engine::ModelConfig::from_json_str(&json.to_string()).unwrap();
        let workers: Vec<_> = split
            .iter()
            .map(|(w, r)| {
                (
                    WorkerId(*w),
                    InfoResponse {
                        layers: config
                            .moe_layers()
                            .iter()
                            .map(|&l| LayerExperts {
                                layer: l as u32,
                                experts: r.clone().collect(),
                            })
                            .collect(),
                        ..Default::default()
                    },
                )
            })
            .collect();
        Placement::from_infos(&ExpertShape::of(&config).unwrap(), &workers).unwrap()
    }

    #[test]
    fn a_token_goes_to_a_worker_once_however_many_of_its_experts_it_chose() {
        let p = placement(&[(0, 0..8), (1, 8..16)]);
        // Token 0 chose 4 experts all on worker 0; token 1 split 2 + 2; token 2 all on worker 1.
        let routing = Routing {
            k: 4,
            ids: vec![0, 1, 2, 3, 4, 5, 9, 10, 12, 13, 14, 15],
            weights: (0..12).map(|i| i as f32).collect(),
        };
        let hidden = 2;
        let x: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let calls = plan_calls(
            1,
            &x,
            hidden,
            &routing,
            &Serving {
                placement: &p,
                down: &BTreeSet::new(),
                salt: 0,
            },
            &opts(Dtype::F32, false),
        )
        .unwrap();
        assert_eq!(calls.len(), 2);
        let (w0, w1) = (&calls[0], &calls[1]);
        assert_eq!((w0.worker, w0.rows.clone()), (WorkerId(0), vec![0, 1]));
        assert_eq!((w1.worker, w1.rows.clone()), (WorkerId(1), vec![1, 2]));
        assert_eq!(w0.request.offsets, vec![0, 4, 6]);
        assert_eq!(w0.request.expert_ids, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(w1.request.offsets, vec![0, 2, 6]);
        assert_eq!(w1.request.weights, vec![6.0, 7.0, 8.0, 9.0, 10.0, 11.0]);
        let rows = codec::decode("h", w1.request.hidden.as_ref().unwrap(), 1 << 20).unwrap();
        assert_eq!(rows, vec![2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn each_token_s_shared_expert_rides_with_exactly_one_call_balanced() {
        let p = placement(&[(0, 0..8), (1, 8..16)]);
        // Tokens 0-3 each visit both workers; token 4 only worker 1.
        let routing = Routing {
            k: 2,
            ids: vec![0, 8, 1, 9, 2, 10, 3, 11, 12, 13],
            weights: vec![1.0; 10],
        };
        let x = vec![0.0; 5 * 2];
        let calls = plan_calls(
            1,
            &x,
            2,
            &routing,
            &Serving {
                placement: &p,
                down: &BTreeSet::new(),
                salt: 0,
            },
            &opts(Dtype::F32, true),
        )
        .unwrap();
        let shared: Vec<Vec<u32>> = calls
            .iter()
            .map(|c| {
                c.request
                    .shared_rows
                    .iter()
                    .map(|&i| c.rows[i as usize])
                    .collect()
            })
            .collect();
        let mut all: Vec<u32> = shared.concat();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3, 4], "every token exactly once");
        assert!(shared[1].contains(&4), "token 4 can only go to worker 1");
        assert_eq!((shared[0].len(), shared[1].len()), (2, 3), "balanced");
    }

    #[test]
    fn a_failed_call_s_work_plans_again_on_the_survivors() {
        let p = placement(&[(0, 0..16), (1, 0..16)]);
        let routing = Routing {
            k: 2,
            ids: vec![0, 9, 3, 4],
            weights: vec![0.5, 0.5, 0.25, 0.75],
        };
        let x: Vec<f32> = (0..4).map(|v| v as f32).collect();
        // Salt 0: row 0 goes to the first holder, row 1 to the second; salt 1 turns it.
        let split = plan_calls(
            1,
            &x,
            2,
            &routing,
            &Serving {
                placement: &p,
                down: &BTreeSet::new(),
                salt: 0,
            },
            &opts(Dtype::F32, true),
        )
        .unwrap();
        let rows: Vec<_> = split.iter().map(|c| (c.worker, c.rows.clone())).collect();
        assert_eq!(rows, vec![(WorkerId(0), vec![0]), (WorkerId(1), vec![1])]);
        // Worker 1 is down: everything goes to worker 0, then worker 0 fails too.
        let calls = plan_calls(
            1,
            &x,
            2,
            &routing,
            &Serving {
                placement: &p,
                down: &BTreeSet::from([WorkerId(1)]),
                salt: 0,
            },
            &opts(Dtype::F32, true),
        )
        .unwrap();
        assert_eq!(calls.len(), 1, "worker 0 serves everything");
        let work = work_of(&calls[0]);
        assert_eq!(work.len(), 2);
        assert_eq!(work[1].pairs, vec![(3, 0.25), (4, 0.75)]);
        assert!(work.iter().all(|w| w.shared));
        let avoid = std::collections::BTreeSet::from([WorkerId(0)]);
        let again = build_calls(
            1,
            &x,
            2,
            work,
            &|row, e| p.serving(1, e, u64::from(row), &avoid),
            Dtype::F32,
        )
        .unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].worker, WorkerId(1));
        assert_eq!(again[0].rows, calls[0].rows);
        assert_eq!(
            again[0].request, calls[0].request,
            "the same call, to another worker"
        );
        // No holder left: planning says which expert.
        let both = std::collections::BTreeSet::from([WorkerId(0), WorkerId(1)]);
        let err = build_calls(
            1,
            &x,
            2,
            work_of(&calls[0]),
            &|row, e| p.serving(1, e, u64::from(row), &both),
            Dtype::F32,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("expert 0 of layer 1"), "{err}");
    }

    #[test]
    fn only_lost_workers_and_moved_experts_are_retried() {
        let worker = |code| RouterError::Worker {
            worker: WorkerId(1),
            addr: "a".into(),
            layer: 1,
            code,
            message: String::new(),
        };
        for code in [
            tonic::Code::Unavailable,
            tonic::Code::DeadlineExceeded,
            tonic::Code::Cancelled,
            tonic::Code::FailedPrecondition,
        ] {
            assert!(retryable(&worker(code)), "{code:?}");
        }
        for code in [tonic::Code::InvalidArgument, tonic::Code::Internal] {
            assert!(!retryable(&worker(code)), "{code:?}");
        }
        assert!(!retryable(&RouterError::Placement("x".into())));
    }

    #[test]
    fn experts_go_to_replicas_of_workers_that_are_down_unless_none_is_left() {
        let p = placement(&[(0, 0..16), (1, 0..8)]);
        let routing = Routing {
            k: 2,
            ids: vec![1, 9],
            weights: vec![0.5, 0.5],
        };
        let down = BTreeSet::from([WorkerId(0)]);
        let calls = plan_calls(
            1,
            &[1.0, 2.0],
            2,
            &routing,
            &Serving {
                placement: &p,
                down: &down,
                salt: 0,
            },
            &opts(Dtype::F32, false),
        )
        .unwrap();
        let to: Vec<_> = calls
            .iter()
            .map(|c| (c.worker, c.request.expert_ids.clone()))
            .collect();
        // Expert 1 has a replica on worker 1; expert 9 lives on worker 0 alone, down or not.
        assert_eq!(to, vec![(WorkerId(0), vec![9]), (WorkerId(1), vec![1])]);
    }

    #[test]
    fn replicas_share_an_expert_s_tokens_evenly_and_the_salt_turns_them() {
        let p = placement(&[(0, 0..16), (1, 0..16), (2, 0..16)]);
        // Nine tokens, all choosing experts 4 and 7.
        let routing = Routing {
            k: 2,
            ids: [4, 7].repeat(9),
            weights: vec![0.5; 18],
        };
        let x = vec![0.0; 9 * 2];
        let share = |salt| {
            plan_calls(
                1,
                &x,
                2,
                &routing,
                &Serving {
                    placement: &p,
                    down: &BTreeSet::new(),
                    salt,
                },
                &opts(Dtype::F32, false),
            )
            .unwrap()
            .into_iter()
            .map(|c| (c.worker, c.rows))
            .collect::<Vec<_>>()
        };
        assert_eq!(
            share(0),
            vec![
                (WorkerId(0), vec![0, 3, 6]),
                (WorkerId(1), vec![1, 4, 7]),
                (WorkerId(2), vec![2, 5, 8]),
            ]
        );
        assert_eq!(share(0), share(0), "the same split every time");
        assert_eq!(share(1)[0], (WorkerId(0), vec![2, 5, 8]));
    }

    #[test]
    fn workers_with_no_chosen_expert_get_no_call() {
        let p = placement(&[(0, 0..8), (1, 8..16)]);
        let routing = Routing {
            k: 2,
            ids: vec![0, 1],
            weights: vec![0.5, 0.5],
        };
        let calls = plan_calls(
            2,
            &[1.0, 2.0],
            2,
            &routing,
            &Serving {
                placement: &p,
                down: &BTreeSet::new(),
                salt: 0,
            },
            &opts(Dtype::Bf16, false),
        )
        .unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].worker, WorkerId(0));
    }
}
