//! kvgpt: GPT-2-family inference on candle with a KV cache that is preallocated per session
//! and written in place. `Model::load` takes a checkpoint directory or a hub id;
//! `Model::generate` runs prefill and decode with sampling, stop conditions and timings.

pub mod bandwidth;
pub mod config;
pub mod cpu_ops;
pub mod error;
pub mod generate;
pub mod hub;
pub mod kv_cache;
pub mod loader;
pub mod matvec;
pub mod model;
pub mod packed;
pub mod sampling;
pub mod session;
pub mod stream;
pub mod tokenizer;
pub mod weights;

pub use config::{GenerationConfig, Gpt2Config};
pub use error::{Error, Result};
pub use generate::{GenerateOptions, Generation, StopReason, Timings, TokenEvent};
pub use hub::HubSettings;
pub use kv_cache::KvCache;
pub use loader::{DeviceKind, LoadOptions, Model, ModelInfo, WeightDType};
pub use model::{Gpt2, Logits};
pub use sampling::SamplingParams;
pub use session::Session;
