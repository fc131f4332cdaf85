//! The model: its config files, its weights as checkpoints store them, GPT-2 itself (the
//! batched forward pass), the per-sequence KV cache, and `Model`, what `load` returns.

pub mod attention;
pub mod config;
pub mod gpt2;
pub mod kv_cache;
pub mod linear;
pub mod loader;
pub mod weights;
