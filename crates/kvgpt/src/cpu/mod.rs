//! CPU kernels for f32 activations: products with f32 and packed (f16, bf16, q8_0) weights,
//! fused GELU and causal attention over per-sequence KV caches, and the bandwidth probe that
//! gives a decode step its floor.

pub mod attention;
pub mod bandwidth;
pub mod int8;
pub mod matvec;
pub mod ops;
pub mod packed;
