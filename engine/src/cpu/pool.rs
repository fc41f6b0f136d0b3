//! The compute thread pool the kernels split their work over.
//!
//! Decode issues a few hundred GEMMs per token, each 50–500 µs of work. A pool whose idle
//! threads sleep (rayon's, which parks on a futex) pays a wake-up of tens of microseconds per
//! GEMM — measured here, it cost a third of decode throughput. These workers instead spin for a
//! short while after each job, so back-to-back jobs start in well under a microsecond, and park
//! once the pool has been idle for `SPIN_FOR`. Jobs are a task count and a closure; workers
//! and the calling thread claim task indices from one atomic counter.
//!
//! A job started from inside a task runs inline on that thread (no nested parallelism), and
//! concurrent callers take turns — also on a one-thread pool, so a process never computes on
//! more threads than its pool has, however many threads call it.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking.
const SPIN_FOR: Duration = Duration::from_micros(300);

type Task = dyn Fn(usize) + Sync;

struct Shared {
    /// The current job's closure; only valid while a job runs.
    job: Mutex<Option<&'static Task>>,
    generation: AtomicU64,
    n_tasks: AtomicUsize,
    next_task: AtomicUsize,
    /// Workers still busy with the current job.
    pending: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    /// Set by [`ComputePool::rest`]: idle workers park now instead of spinning.
    resting: AtomicBool,
    sleep_lock: Mutex<()>,
    wake: Condvar,
}

/// A fixed set of compute threads.
pub struct ComputePool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises concurrent callers.
    run_lock: Mutex<()>,
}

impl std::fmt::Debug for ComputePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputePool")
            .field("threads", &self.threads())
            .finish()
    }
}

thread_local! {
    static IN_TASK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

static GLOBAL: OnceLock<ComputePool> = OnceLock::new();

/// Whether `SWITCHYARD_IDLE=spin` asked for [`ComputePool::rest`] to be ignored (read once).
fn spin_while_waiting() -> bool {
    static SPIN: OnceLock<bool> = OnceLock::new();
    *SPIN.get_or_init(|| std::env::var("SWITCHYARD_IDLE").is_ok_and(|v| v == "spin"))
}

/// Sets the global pool's size; the first caller wins. Returns the size in effect.
pub fn init_global(threads: usize) -> usize {
    GLOBAL.get_or_init(|| ComputePool::new(threads)).threads()
}

/// The global pool (all cores unless [`init_global`] said otherwise).
pub fn global() -> &'static ComputePool {
    GLOBAL.get_or_init(|| {
        ComputePool::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    })
}

impl ComputePool {
    /// A pool of `threads` compute threads in all: the caller plus `threads - 1` workers.
    pub fn new(threads: usize) -> ComputePool {
        let shared = Arc::new(Shared {
            job: Mutex::new(None),
            generation: AtomicU64::new(0),
            n_tasks: AtomicUsize::new(0),
            next_task: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            resting: AtomicBool::new(false),
            sleep_lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..threads.max(1))
            .filter_map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("switchyard-compute-{i}"))
                    .spawn(move || worker(&shared))
                    .ok()
            })
            .collect();
        ComputePool {
            shared,
            workers,
            run_lock: Mutex::new(()),
        }
    }

    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Lets idle workers park at once rather than spin: call before this process waits on
    /// something else (a network reply) so spinning does not take cores another process on the
    /// machine needs. The next [`run`](Self::run) wakes them.
    ///
    /// `SWITCHYARD_IDLE=spin` in the environment turns this off (idle threads spin their
    /// `SPIN_FOR` window even while the process waits), to measure spin against park.
    pub fn rest(&self) {
        if !spin_while_waiting() {
            self.shared.resting.store(true, Ordering::Relaxed);
        }
    }

    /// Runs `f(i, chunk)` over `data` cut into chunks of `chunk` elements (the last may be
    /// shorter), the chunks spread over the pool; returns when all are done.
    pub fn for_each_chunk_mut<T: Send>(
        &self,
        data: &mut [T],
        chunk: usize,
        f: &(dyn Fn(usize, &mut [T]) + Sync),
    ) {
        let chunk = chunk.max(1);
        let (len, ptr) = (data.len(), SendPtr(data.as_mut_ptr()));
        self.run(len.div_ceil(chunk), &|i| {
            let start = i * chunk;
            let n = chunk.min(len - start);
            // SAFETY: task i alone gets elements start..start + n, inside `data`, which
            // outlives `run`.
            let part = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(start), n) };
            f(i, part);
        });
    }

    /// Runs `f(0..n_tasks)` across the pool and returns when every task is done.
    pub fn run(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if n_tasks == 0 {
            return;
        }
        if IN_TASK.with(|t| t.get()) {
            for i in 0..n_tasks {
                f(i);
            }
            return;
        }
        // Callers take turns even when the job runs on the caller alone (a one-thread pool, or
        // one task): otherwise concurrent callers — a worker's overlapping calls, say — would
        // compute on more threads than the pool has.
        let _turn = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        if n_tasks == 1 || self.workers.is_empty() {
            let _in_task = InTask::enter();
            for i in 0..n_tasks {
                f(i);
            }
            return;
        }
        let s = &*self.shared;
        // SAFETY: the 'static lifetime is a lie the workers never observe: the job is cleared,
        // and every worker has finished with it (`pending` is zero), before `run` returns.
        let job: &'static Task =
            unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync + '_), &'static Task>(f) };
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(job);
        s.n_tasks.store(n_tasks, Ordering::Relaxed);
        s.next_task.store(0, Ordering::Relaxed);
        s.pending.store(self.workers.len(), Ordering::Relaxed);
        s.panicked.store(false, Ordering::Relaxed);
        s.resting.store(false, Ordering::Relaxed);
        s.generation.fetch_add(1, Ordering::Release);
        {
            let _g = s.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| claim_tasks(s, f)));
        while s.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Err(payload) = mine {
            resume_unwind(payload);
        }
        if s.panicked.load(Ordering::Relaxed) {
            panic!("a compute task panicked on a worker thread");
        }
    }
}

/// Marks this thread as inside a task until dropped — also when the task panics, so a thread
/// that ran a panicking task does not run every later job inline.
struct InTask;

impl InTask {
    fn enter() -> InTask {
        IN_TASK.with(|t| t.set(true));
        InTask
    }
}

impl Drop for InTask {
    fn drop(&mut self) {
        IN_TASK.with(|t| t.set(false));
    }
}

fn claim_tasks(s: &Shared, f: &(dyn Fn(usize) + Sync + '_)) {
    let _in_task = InTask::enter();
    let n = s.n_tasks.load(Ordering::Relaxed);
    loop {
        let i = s.next_task.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        f(i);
    }
}

fn worker(s: &Shared) {
    // Generation 0 is "no job yet": a job published before this thread got going still counts.
    let mut seen = 0;
    loop {
        // Spin, then park, until a new job is published.
        let idle_since = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.shutdown.load(Ordering::Relaxed) {
                return;
            }
            if s.generation.load(Ordering::Acquire) != seen {
                break;
            }
            spins = spins.wrapping_add(1);
            let rest = s.resting.load(Ordering::Relaxed);
            if rest || (spins.is_multiple_of(1024) && idle_since.elapsed() > SPIN_FOR) {
                let guard = s.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
                if s.generation.load(Ordering::Acquire) == seen
                    && !s.shutdown.load(Ordering::Relaxed)
                {
                    let _unused = s
                        .wake
                        .wait_timeout(guard, Duration::from_millis(100))
                        .unwrap_or_else(|e| e.into_inner());
                }
            } else {
                std::hint::spin_loop();
            }
        }
        seen = s.generation.load(Ordering::Acquire);
        let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = job
            && catch_unwind(AssertUnwindSafe(|| claim_tasks(s, f))).is_err()
        {
            s.panicked.store(true, Ordering::Relaxed);
        }
        s.pending.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for ComputePool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Relaxed);
        {
            let _g = self
                .shared
                .sleep_lock
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A raw pointer the pool's tasks share, each using a disjoint part of what it points to.
struct SendPtr<T>(*mut T);
// SAFETY: tasks touch disjoint elements (see `for_each_chunk_mut`), and T: Send.
unsafe impl<T: Send> Send for SendPtr<T> {}
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    // A method, so closures capture the whole (Sync) wrapper rather than its raw field.
    fn get(&self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_exactly_once() {
        let pool = ComputePool::new(3);
        for n in [1usize, 2, 7, 100] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn chunks_cover_the_data_once_each() {
        let pool = ComputePool::new(3);
        for (len, chunk) in [(0, 4), (1, 4), (10, 3), (12, 4), (100, 1)] {
            let mut data = vec![0usize; len];
            pool.for_each_chunk_mut(&mut data, chunk, &|i, part| {
                for v in part.iter_mut() {
                    *v += i + 1;
                }
            });
            let want: Vec<usize> = (0..len).map(|j| j / chunk + 1).collect();
            assert_eq!(data, want, "{len} in chunks of {chunk}");
        }
    }

    #[test]
    fn nested_jobs_run_inline() {
        let pool = ComputePool::new(2);
        let total = AtomicUsize::new(0);
        pool.run(4, &|_| {
            pool.run(3, &|_| {
                total.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(total.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn a_panicking_task_panics_the_caller_and_the_pool_survives() {
        let pool = ComputePool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(8, &|i| {
                if i == 5 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        pool.run(8, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 8);
    }

    /// Runs `tasks` tasks that each wait (bounded) until all have started, and returns the
    /// distinct OS threads they ran on: with as many tasks as threads, every thread must take
    /// one, so a pool that runs them on fewer threads shows it.
    fn threads_used(pool: &ComputePool, tasks: usize) -> usize {
        let started = AtomicUsize::new(0);
        let ids = Mutex::new(std::collections::HashSet::new());
        pool.run(tasks, &|_| {
            ids.lock().unwrap().insert(std::thread::current().id());
            started.fetch_add(1, Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(2);
            while started.load(Ordering::SeqCst) < tasks && Instant::now() < deadline {
                std::hint::spin_loop();
            }
        });
        ids.into_inner().unwrap().len()
    }

    #[test]
    fn a_pool_of_n_threads_runs_tasks_on_n_os_threads() {
        let one = ComputePool::new(1);
        let ids = Mutex::new(std::collections::HashSet::new());
        one.run(8, &|_| {
            ids.lock().unwrap().insert(std::thread::current().id());
        });
        assert_eq!(ids.into_inner().unwrap().len(), 1);
        assert_eq!(one.threads(), 1);
        assert_eq!(threads_used(&ComputePool::new(2), 2), 2);
        assert_eq!(threads_used(&ComputePool::new(3), 3), 3);
    }

    #[test]
    fn after_a_panicking_task_the_caller_still_uses_every_thread() {
        let pool = ComputePool::new(2);
        for _ in 0..3 {
            // Every task panics, so the calling thread surely runs one.
            let r = catch_unwind(AssertUnwindSafe(|| pool.run(4, &|_| panic!("boom"))));
            assert!(r.is_err());
        }
        assert_eq!(
            threads_used(&pool, 2),
            2,
            "the caller fell back to running jobs inline"
        );
    }

    /// Concurrent callers (a worker's overlapping calls) never compute on more threads than
    /// the pool has — also for a one-thread pool and for one-task jobs, which run on the
    /// caller. Bounded: a deadlock fails on the timeout.
    #[test]
    fn concurrent_callers_never_compute_on_more_threads_than_the_pool_has() {
        for (threads, tasks) in [(1, 1), (1, 4), (2, 1), (2, 2)] {
            let pool = Arc::new(ComputePool::new(threads));
            let active = Arc::new(AtomicUsize::new(0));
            let most = Arc::new(AtomicUsize::new(0));
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            for _ in 0..4 {
                let (pool, active, most, done) =
                    (pool.clone(), active.clone(), most.clone(), done_tx.clone());
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        pool.run(tasks, &|_| {
                            let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_micros(200));
                            active.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                    let _ = done.send(());
                });
            }
            for _ in 0..4 {
                done_rx
                    .recv_timeout(Duration::from_secs(20))
                    .expect("a caller finished in time");
            }
            let most = most.load(Ordering::SeqCst);
            assert!(
                most <= threads,
                "a pool of {threads} ran {most} tasks at once ({tasks} per job)"
            );
        }
    }

    #[test]
    fn concurrent_callers_take_turns() {
        let pool = Arc::new(ComputePool::new(2));
        let count = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (pool, count) = (pool.clone(), count.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        pool.run(5, &|_| {
                            count.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(count.load(Ordering::Relaxed), 4 * 50 * 5);
    }
}
