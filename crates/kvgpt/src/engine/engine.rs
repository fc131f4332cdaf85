//! `Engine`: a model's scheduler on a thread of its own, shared by callers on other threads
//! (the Node binding's concurrent requests). `submit` queues a job and returns at once; the
//! engine thread admits it at its next step, batches it with everything else in flight, and
//! calls the job's callbacks from that thread. The thread sleeps while there is no work and
//! ends once the engine is dropped and its last request has ended.

use crate::engine::generate::{GenerateOptions, Generation, TokenEvent};
use crate::engine::scheduler::{Abort, EngineOptions, EngineStats, FeedRequest, GenerateRequest, Prompt, Request, Scheduler, ScoreRequest};
use crate::engine::score::{Score, ScoreOptions};
use crate::engine::session::Session;
use crate::error::{Error, Result};
use crate::model::loader::Model;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// A request as another thread hands it over.
pub enum Job {
    Generate {
        prompt: Prompt,
        options: GenerateOptions,
        abort: Arc<AtomicBool>,
        on_token: Option<Box<dyn FnMut(TokenEvent<'_>) + Send>>,
        on_done: Box<dyn FnOnce(Result<Generation>) + Send>,
    },
    Feed {
        session: Arc<Mutex<Session>>,
        ids: Vec<u32>,
        on_done: Box<dyn FnOnce(Result<u32>) + Send>,
    },
    Score {
        text: Prompt,
        options: ScoreOptions,
        abort: Arc<AtomicBool>,
        on_progress: Option<Box<dyn FnMut(usize, usize) + Send>>,
        on_done: Box<dyn FnOnce(Result<Score>) + Send>,
    },
}

impl Job {
    fn into_request(self) -> Request<'static> {
        match self {
            Job::Generate { prompt, options, abort, on_token, on_done } => Request::Generate(GenerateRequest {
                prompt,
                options,
                abort: Abort::Shared(abort),
                on_token: on_token.map(|f| f as Box<dyn FnMut(TokenEvent<'_>)>),
                on_done,
            }),
            Job::Feed { session, ids, on_done } => Request::Feed(FeedRequest { session, ids, on_done }),
            Job::Score { text, options, abort, on_progress, on_done } => Request::Score(ScoreRequest {
                text,
                options,
                abort: Abort::Shared(abort),
                on_progress: on_progress.map(|f| f as Box<dyn FnMut(usize, usize)>),
                on_done,
            }),
        }
    }
}

struct Inbox {
    /// Jobs and when they arrived (a job can wait here while a step runs).
    jobs: Vec<(Job, Instant)>,
    closed: bool,
}

struct Shared {
    inbox: Mutex<Inbox>,
    wake: Condvar,
}

/// A lock that outlives a panic elsewhere: the data behind these locks stays consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Engine {
    shared: Arc<Shared>,
    options: EngineOptions,
    /// The scheduler's figures, which it keeps current.
    stats: Arc<Mutex<EngineStats>>,
}

impl Engine {
    /// Starts the engine thread of `model`.
    pub fn start(model: Arc<Model>, options: EngineOptions) -> Result<Self> {
        options.validate()?;
        let shared = Arc::new(Shared { inbox: Mutex::new(Inbox { jobs: Vec::new(), closed: false }), wake: Condvar::new() });
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        let (thread_shared, thread_stats, thread_options) = (shared.clone(), stats.clone(), options.clone());
        std::thread::Builder::new()
            .name("kvgpt-engine".into())
            .spawn(move || {
                // The loop runs on a worker of a rayon pool of its own (as many threads as the
                // global pool): each parallel op of a step (at least six a layer: four products,
                // attention, GELU) then starts on the thread that asks for it, where from a
                // thread outside the pool it was handed to a worker and waited for, two thread
                // switches an op. GPT-2 small, 2 threads, medians of 3 alternating runs: decode
                // at contexts 16 and 512 3-12 % faster, a 512-token prefill 8-11 % (f16, q8_0;
                // bench/NOTES.md, item 22).
                match rayon::ThreadPoolBuilder::new().num_threads(rayon::current_num_threads()).thread_name(|i| format!("kvgpt-engine-{i}")).build() {
                    Ok(pool) => pool.install(|| run(&model, thread_options, &thread_shared, thread_stats)),
                    Err(_) => run(&model, thread_options, &thread_shared, thread_stats),
                }
            })
            .map_err(|e| Error::internal(format!("cannot start the engine thread: {e}")))?;
        Ok(Self { shared, options, stats })
    }

    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    /// Queues a job for the next step.
    pub fn submit(&self, job: Job) -> Result<()> {
        let mut inbox = lock(&self.shared.inbox);
        if inbox.closed {
            return Err(Error::Disposed);
        }
        inbox.jobs.push((job, Instant::now()));
        self.shared.wake.notify_one();
        Ok(())
    }

    /// The engine's figures: a request whose result has been handed over is counted.
    pub fn stats(&self) -> EngineStats {
        let mut stats = lock(&self.stats).clone();
        stats.waiting += lock(&self.shared.inbox).jobs.len();
        stats
    }
}

/// Refuses new jobs; the thread ends once what it holds has ended.
impl Drop for Engine {
    fn drop(&mut self) {
        lock(&self.shared.inbox).closed = true;
        self.shared.wake.notify_one();
    }
}

fn run(model: &Model, options: EngineOptions, shared: &Shared, stats: Arc<Mutex<EngineStats>>) {
    // The engine's handle reads the scheduler's figures as they change.
    let Ok(mut scheduler) = Scheduler::with_stats(model, options, stats) else { return };
    loop {
        {
            let mut inbox = lock(&shared.inbox);
            loop {
                for (job, at) in inbox.jobs.drain(..) {
                    scheduler.submit_at(job.into_request(), at);
                }
                if !scheduler.is_idle() {
                    break;
                }
                if inbox.closed {
                    return;
                }
                inbox = shared.wake.wait(inbox).unwrap_or_else(|e| e.into_inner());
            }
        }
        match catch_unwind(AssertUnwindSafe(|| scheduler.step())) {
            Ok(true) => {}
            // Work in flight but nothing to run would spin forever: end it instead.
            Ok(false) if !scheduler.is_idle() => scheduler.fail_all(&Error::internal("the engine found nothing to run for its requests")),
            Ok(false) => {}
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown panic");
                scheduler.fail_all(&Error::internal(format!("a forward pass panicked: {what}")));
            }
        }
    }
}
