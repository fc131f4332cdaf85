//! The engine: many sequences in one forward pass (continuous batching). `Scheduler` decides
//! each step who joins, who leaves and which tokens ride along; `Engine` runs it on a thread of
//! its own for a model shared by many callers. A request owns its options, sampler, stop
//! conditions and timings (`generate`); a `Session` is one sequence held across calls; `score`
//! gives a text's log-probabilities and perplexity.

pub mod engine;
pub mod generate;
pub mod sampling;
pub mod scheduler;
pub mod score;
pub mod session;
pub mod stream;
