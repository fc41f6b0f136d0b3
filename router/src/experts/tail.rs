//! Tail tolerance for expert calls: recent call times per layer and call size, and the pure
//! policies that act on them.
//!
//! A call that has waited longer than [`TailOptions::hedge_after_p99`] times the recent p99 of
//! calls like it (same layer, rows within a factor of two) is sent again to replicas of its
//! experts, and whichever answer is complete first is taken ([`hedge_delay`]); a budget
//! ([`CALLS_PER_HEDGE`]) keeps a general slowdown from doubling the load. Every call's deadline
//! also follows the recent p99 ([`call_deadline`]), within a floor and the configured deadline,
//! so a stalled worker with no replica fails its calls in about a second, not after the fixed
//! deadline. A call bigger than any seen is judged by smaller ones scaled up by the size
//! ratio; until a layer has [`MIN_SAMPLES`] calls of some size, nothing adapts: the configured
//! deadline holds and no call is hedged.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use switchyard_proto::WorkerId;

use super::transport::WorkerLink;

/// How the dispatcher reacts to slow calls.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TailOptions {
    /// Hedge a call after this many times the recent p99 of calls like it; 0 never hedges.
    pub hedge_after_p99: f64,
    /// Never hedge sooner than this, however fast calls have been.
    pub hedge_min: Duration,
    /// A call's deadline is this many times the recent p99 of calls like it (within
    /// `deadline_min` and the configured deadline); 0 keeps the configured deadline.
    pub deadline_p99: f64,
    /// The adaptive deadline's floor.
    pub deadline_min: Duration,
}

impl Default for TailOptions {
    fn default() -> Self {
        TailOptions {
            hedge_after_p99: 3.0,
            hedge_min: Duration::from_millis(10),
            deadline_p99: 20.0,
            deadline_min: Duration::from_secs(1),
        }
    }
}

/// Calls a size class needs before its p99 is acted on.
pub const MIN_SAMPLES: usize = 32;
/// Recent calls kept per size class.
pub const WINDOW: usize = 128;
/// Answered calls that earn one hedge: over time at most about one call in ten is hedged.
pub const CALLS_PER_HEDGE: u32 = 10;
/// Hedges that can be saved up, so a burst of stalls is covered.
pub const HEDGE_BURST: u32 = 10;
/// How often the cached p99 of a size class is recomputed, in recorded calls.
const REFRESH_EVERY: u32 = 16;

/// When a call still unanswered is hedged: `multiple × p99`, at least `hedge_min`, and
/// sooner than `deadline` (a hedge after the deadline would be no use). `None`: not hedged.
pub fn hedge_delay(
    p99: Option<Duration>,
    options: &TailOptions,
    deadline: Duration,
) -> Option<Duration> {
    let p99 = p99?;
    if options.hedge_after_p99 <= 0.0 {
        return None;
    }
    let after = p99.mul_f64(options.hedge_after_p99).max(options.hedge_min);
    (after < deadline).then_some(after)
}

/// The deadline of a call: `multiple × p99` within `[deadline_min, deadline]`; `deadline`
/// itself until the call's size class has a p99.
pub fn call_deadline(p99: Option<Duration>, options: &TailOptions, deadline: Duration) -> Duration {
    match p99 {
        Some(p99) if options.deadline_p99 > 0.0 => p99
            .mul_f64(options.deadline_p99)
            .max(options.deadline_min)
            .min(deadline),
        _ => deadline,
    }
}

/// Calls of 2^k..2^(k+1) rows share a class: call time grows with rows, and a prefill
/// chunk's call must not be judged by decode calls' times.
fn size_class(rows: usize) -> u32 {
    usize::BITS - rows.max(1).leading_zeros()
}

#[derive(Debug, Default)]
struct Window {
    /// Round trips in microseconds, a ring once full.
    micros: Vec<u32>,
    next: usize,
    since_refresh: u32,
    p99: Option<Duration>,
}

impl Window {
    fn record(&mut self, round_trip: Duration) {
        let us = u32::try_from(round_trip.as_micros()).unwrap_or(u32::MAX);
        if self.micros.len() < WINDOW {
            self.micros.push(us);
        } else {
            self.micros[self.next] = us;
        }
        self.next = (self.next + 1) % WINDOW;
        self.since_refresh += 1;
        if self.micros.len() >= MIN_SAMPLES
            && (self.p99.is_none() || self.since_refresh >= REFRESH_EVERY)
        {
            self.since_refresh = 0;
            let mut sorted = self.micros.clone();
            let k = (sorted.len() * 99).div_ceil(100) - 1;
            let (_, p99, _) = sorted.select_nth_unstable(k);
            self.p99 = Some(Duration::from_micros(u64::from(*p99)));
        }
    }
}

#[derive(Debug)]
struct State {
    windows: HashMap<(usize, u32), Window>,
    /// Answered calls not yet spent on hedges, at most `HEDGE_BURST` hedges' worth.
    credit: u32,
}

/// Recent round trips of answered calls, by layer and size class; and the hedge budget.
#[derive(Debug)]
pub struct CallTimes {
    state: Mutex<State>,
}

impl Default for CallTimes {
    fn default() -> Self {
        CallTimes {
            state: Mutex::new(State {
                windows: HashMap::new(),
                credit: HEDGE_BURST * CALLS_PER_HEDGE,
            }),
        }
    }
}

impl CallTimes {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An answered call of `rows` rows on `layer` took `round_trip`.
    pub fn record(&self, layer: usize, rows: usize, round_trip: Duration) {
        let mut s = self.state();
        s.credit = (s.credit + 1).min(HEDGE_BURST * CALLS_PER_HEDGE);
        s.windows
            .entry((layer, size_class(rows)))
            .or_default()
            .record(round_trip);
    }

    /// The recent p99 of calls like one of `rows` rows on `layer`: its own size class's; until
    /// that has enough calls, the nearest larger class's (an upper bound: bigger calls take
    /// longer); failing that, the nearest smaller class's scaled up by the ratio of the
    /// classes' sizes (also an upper bound: a call's fixed costs do not grow with its rows).
    /// A step recomputed after a failure sends calls bigger than any seen, and they must not
    /// fall back to the fixed deadline. `None` while the layer has no class with enough calls.
    pub fn p99(&self, layer: usize, rows: usize) -> Option<Duration> {
        let s = self.state();
        let class = size_class(rows);
        let p99 = |c: u32| s.windows.get(&(layer, c)).and_then(|w| w.p99);
        (class..=usize::BITS).find_map(p99).or_else(|| {
            (0..class)
                .rev()
                .find_map(|c| p99(c).map(|d| d.saturating_mul(1 << (class - c).min(31))))
        })
    }

    /// Spends one hedge from the budget; `false` when it is used up.
    pub fn take_hedge(&self) -> bool {
        let mut s = self.state();
        if s.credit >= CALLS_PER_HEDGE {
            s.credit -= CALLS_PER_HEDGE;
            true
        } else {
            false
        }
    }
}

/// How often a suspect worker is probed.
pub const PROBE_EVERY: Duration = Duration::from_millis(100);
/// How long a probe waits for its answer.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(1);

/// Workers avoided (while their experts have replicas) because a call to them missed its
/// time, each until a health probe ([`WorkerLink::info`]) answers: a stopped or overloaded
/// process keeps no calls waiting once it is suspect, and takes calls again the moment it
/// answers. Each suspect is probed on the link it was marked on; a new link for the same
/// worker (a new address) replaces it, and the old probe stops.
#[derive(Debug, Default)]
pub struct Suspects {
    set: Arc<Mutex<SuspectSet>>,
    gauge: Gauge,
}

type SuspectSet = BTreeMap<WorkerId, Arc<dyn WorkerLink>>;

impl Suspects {
    /// Suspects whose count is published on `gauge`.
    pub fn new(gauge: Gauge) -> Suspects {
        Suspects {
            set: Arc::default(),
            gauge,
        }
    }

    fn lock(set: &Mutex<SuspectSet>) -> std::sync::MutexGuard<'_, SuspectSet> {
        set.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `link`'s worker suspect and, unless it already is on this very link, starts
    /// probing it on `runtime`. Returns whether a probe was started.
    pub fn mark(&self, link: Arc<dyn WorkerLink>, runtime: &tokio::runtime::Handle) -> bool {
        let id = link.worker();
        {
            let mut set = Self::lock(&self.set);
            if set.get(&id).is_some_and(|l| Arc::ptr_eq(l, &link)) {
                return false;
            }
            set.insert(id, link.clone());
            self.gauge.set(set.len() as i64);
        }
        tracing::warn!(worker = %id, addr = link.addr(), "expert worker missed a call's time; avoided while replicas exist until it answers a probe");
        let (set, gauge) = (self.set.clone(), self.gauge.clone());
        runtime.spawn(async move {
            // This probe's own: the worker is still suspect on this link.
            let mine = |set: &SuspectSet| set.get(&id).is_some_and(|l| Arc::ptr_eq(l, &link));
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                if !mine(&Self::lock(&set)) {
                    return;
                }
                let answered = matches!(
                    tokio::time::timeout(PROBE_DEADLINE, link.info(PROBE_DEADLINE)).await,
                    Ok(Ok(_))
                );
                if answered {
                    let mut set = Self::lock(&set);
                    if mine(&set) {
                        set.remove(&id);
                        gauge.set(set.len() as i64);
                        tracing::info!(worker = %id, "suspect expert worker answered a probe; it takes calls again");
                    }
                    return;
                }
            }
        });
        true
    }

    /// The workers suspect now.
    pub fn all(&self) -> BTreeSet<WorkerId> {
        Self::lock(&self.set).keys().copied().collect()
    }

    /// Forgets (and stops probing) every suspect whose link `links` no longer holds: workers
    /// no placement names, or names at a new address.
    pub fn retain(&self, links: &BTreeMap<WorkerId, Arc<dyn WorkerLink>>) {
        let mut set = Self::lock(&self.set);
        set.retain(|id, link| links.get(id).is_some_and(|l| Arc::ptr_eq(l, link)));
        self.gauge.set(set.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn nothing_adapts_before_a_size_class_has_enough_calls() {
        let t = CallTimes::default();
        for _ in 0..MIN_SAMPLES - 1 {
            t.record(3, 1, 2 * MS);
        }
        assert_eq!(t.p99(3, 1), None);
        let o = TailOptions::default();
        assert_eq!(hedge_delay(t.p99(3, 1), &o, 10_000 * MS), None);
        assert_eq!(call_deadline(t.p99(3, 1), &o, 10_000 * MS), 10_000 * MS);
        t.record(3, 1, 2 * MS);
        assert_eq!(t.p99(3, 1), Some(2 * MS));
    }

    #[test]
    fn p99_ignores_the_slowest_percent_and_follows_recent_calls() {
        let t = CallTimes::default();
        // 127 calls of 1 ms and one of 500 ms: the p99 of 128 is the second largest.
        for _ in 0..127 {
            t.record(0, 4, MS);
        }
        t.record(0, 4, 500 * MS);
        assert_eq!(t.p99(0, 4), Some(MS));
        // A window later, calls take 5 ms: so does the p99.
        for _ in 0..WINDOW {
            t.record(0, 4, 5 * MS);
        }
        assert_eq!(t.p99(0, 4), Some(5 * MS));
    }

    #[test]
    fn a_call_bigger_than_any_seen_is_judged_by_smaller_ones_scaled_up() {
        let t = CallTimes::default();
        for _ in 0..WINDOW {
            t.record(1, 8, MS);
        }
        // Calls of 512 rows have no class of their own yet, nor any larger one: the 8-row
        // class's p99 is scaled by 64 (the classes 512..1023 and 8..15).
        assert_eq!(t.p99(1, 512), Some(64 * MS));
        // A small call with no history of its own borrows the larger class's p99.
        assert_eq!(t.p99(1, 1), Some(MS));
        // Other layers are separate.
        assert_eq!(t.p99(2, 8), None);
    }

    #[test]
    fn hedge_waits_a_multiple_of_p99_with_a_floor_and_before_the_deadline() {
        let o = TailOptions::default();
        let deadline = 10_000 * MS;
        assert_eq!(hedge_delay(Some(20 * MS), &o, deadline), Some(60 * MS));
        assert_eq!(hedge_delay(Some(MS), &o, deadline), Some(o.hedge_min));
        assert_eq!(hedge_delay(Some(5_000 * MS), &o, deadline), None);
        let off = TailOptions {
            hedge_after_p99: 0.0,
            ..o
        };
        assert_eq!(hedge_delay(Some(20 * MS), &off, deadline), None);
    }

    #[test]
    fn deadline_adapts_within_its_floor_and_the_configured_deadline() {
        let o = TailOptions::default();
        let deadline = 10_000 * MS;
        assert_eq!(call_deadline(Some(MS), &o, deadline), o.deadline_min);
        assert_eq!(call_deadline(Some(100 * MS), &o, deadline), 2_000 * MS);
        assert_eq!(call_deadline(Some(900 * MS), &o, deadline), deadline);
        let fixed = TailOptions {
            deadline_p99: 0.0,
            ..o
        };
        assert_eq!(call_deadline(Some(MS), &fixed, deadline), deadline);
    }

    #[test]
    fn hedge_budget_allows_a_burst_then_one_hedge_per_ten_answered_calls() {
        let t = CallTimes::default();
        let burst = (0..100).take_while(|_| t.take_hedge()).count();
        assert_eq!(burst, HEDGE_BURST as usize);
        for _ in 0..CALLS_PER_HEDGE {
            t.record(0, 1, MS);
        }
        assert!(t.take_hedge());
        assert!(!t.take_hedge());
    }

    #[test]
    fn a_suspect_is_probed_on_its_newest_link_and_cleared_when_that_answers() {
        use super::super::transport::{Fault, LocalWorker, MemoryTransport, Transport};
        use switchyard_proto::v1::{self, ForwardRequest, InfoResponse};

        struct Idle;
        impl LocalWorker for Idle {
            fn forward(&self, _: &ForwardRequest) -> Result<v1::Tensor, tonic::Status> {
                Err(tonic::Status::unimplemented("probes only"))
            }
            fn info(&self) -> InfoResponse {
                InfoResponse::default()
            }
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let net = MemoryTransport::new();
        net.serve("old", Arc::new(Idle));
        net.serve("new", Arc::new(Idle));
        net.set_fault("old", Some(Fault::Hang));
        let (old, new) = {
            let _in = rt.enter();
            (
                net.connect(WorkerId(4), "old").unwrap(),
                net.connect(WorkerId(4), "new").unwrap(),
            )
        };
        let suspects = Suspects::default();
        assert!(suspects.mark(old.clone(), rt.handle()));
        assert!(!suspects.mark(old, rt.handle()), "one probe per link");
        std::thread::sleep(3 * PROBE_EVERY);
        assert_eq!(
            suspects.all(),
            [WorkerId(4)].into(),
            "the stopped link never answers"
        );
        // The worker moved: probed at its new address, it is cleared.
        assert!(suspects.mark(new, rt.handle()));
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while !suspects.all().is_empty() {
            assert!(std::time::Instant::now() < until, "never cleared");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(suspects.gauge.get(), 0);
    }

    #[test]
    fn concurrent_recording_and_reading_neither_deadlocks_nor_loses_calls() {
        let t = std::sync::Arc::new(CallTimes::default());
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        for k in 0..4 {
            let t = t.clone();
            let done = done_tx.clone();
            std::thread::spawn(move || {
                for i in 0..2_000 {
                    t.record(k % 2, 1 + i % 3, MS);
                    let _ = t.p99(k % 2, 2);
                    let _ = t.take_hedge();
                }
                let _ = done.send(());
            });
        }
        for _ in 0..4 {
            done_rx
                .recv_timeout(Duration::from_secs(20))
                .expect("a recording thread hung");
        }
        assert_eq!(t.p99(0, 2), Some(MS));
    }
}
