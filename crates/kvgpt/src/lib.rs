//! kvgpt: GPT-2-family inference on candle with a KV cache that is preallocated per sequence
//! and written in place. `Model::load` takes a checkpoint directory or a hub id;
//! `Model::generate` runs prefill and decode with sampling, stop conditions and timings;
//! `Engine` batches many concurrent sequences into one forward pass a step.
//!
//! Layout: `model/` (config, weights, GPT-2, KV cache, `Model`), `engine/` (scheduler, engine
//! thread, sessions, generation, sampling, stop strings), `cpu/` (kernels), `cuda/` (kernels,
//! with the `cuda` feature).

pub use candle_core;

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod engine;
pub mod error;
pub mod hub;
pub mod model;
pub mod tokenizer;

pub use engine::engine::{Engine, Job};
pub use engine::generate::{GenerateOptions, Generation, StopReason, Timings, TokenEvent};
pub use engine::sampling::SamplingParams;
pub use engine::scheduler::{EngineOptions, EngineStats, Prompt, Scheduler};
pub use engine::score::{Score, ScoreOptions, ScoreTimings, ScoredToken, TokenLogprob, MAX_LOGPROBS};
pub use engine::session::Session;
pub use error::{Error, Result};
pub use hub::HubSettings;
pub use model::config::{GenerationConfig, Gpt2Config};
pub use model::gpt2::{Gpt2, Logits, Segment, StepLogits};
pub use model::kv_cache::KvCache;
pub use model::loader::{DeviceKind, LoadOptions, Model, ModelInfo, WeightDType};
