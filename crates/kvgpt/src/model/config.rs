//! The Hugging Face `config.json` of a GPT-2-family checkpoint, and `generation_config.json`.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// The MLP activation named by `activation_function`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation GPT-2 was trained with.
    GeluTanh,
    /// `gelu`: the exact erf form.
    GeluErf,
    Relu,
    /// `silu` / `swish`.
    Silu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "gelu" => Self::GeluErf,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            _ => return None,
        })
    }
}

/// HF's eos_token_id may be one id or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    n_positions: Option<usize>,
    n_ctx: Option<usize>,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    n_inner: Option<usize>,
    activation_function: Option<String>,
    layer_norm_epsilon: Option<f64>,
    tie_word_embeddings: Option<bool>,
    scale_attn_weights: Option<bool>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    tokenizer_class: Option<String>,
}

/// A validated GPT-2 configuration, field names as in the checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// The MLP width: `n_inner`, or 4 x n_embd when null.
    pub n_inner: usize,
    pub activation: Activation,
    pub activation_function: String,
    pub layer_norm_epsilon: f64,
    pub tie_word_embeddings: bool,
    pub scale_attn_weights: bool,
    pub scale_attn_by_inverse_layer_idx: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub tokenizer_class: Option<String>,
}

impl Gpt2Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::FileNotFound {
                what: "config.json",
                path: path.to_path_buf(),
                hint: "a model directory needs the config.json written by save_pretrained".into(),
            },
            _ => Error::invalid_file(path, e),
        })?;
        Self::from_json(&text).map_err(|e| match e {
            Error::InvalidFile { reason, .. } => Error::invalid_file(path, reason),
            other => other,
        })
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text)
            .map_err(|e| Error::invalid_file("config.json", format!("not a GPT-2 config: {e}")))?;
        match raw.model_type.as_deref() {
            None | Some("gpt2") => {}
            Some(other) => {
                return Err(Error::UnsupportedModel(format!(
                    "model_type is {other:?}; kvgpt runs GPT-2-family checkpoints (model_type \"gpt2\")"
                )))
            }
        }
        let act_name = raw.activation_function.unwrap_or_else(|| "gelu_new".into());
        let activation = Activation::parse(&act_name).ok_or_else(|| {
            Error::UnsupportedModel(format!(
                "activation_function {act_name:?} is not one of gelu_new, gelu_pytorch_tanh, gelu_fast, gelu, relu, silu, swish"
            ))
        })?;
        let n_positions = raw.n_positions.or(raw.n_ctx).ok_or_else(|| {
            Error::invalid_file("config.json", "neither n_positions nor n_ctx is set")
        })?;
        let cfg = Gpt2Config {
            vocab_size: raw.vocab_size,
            n_positions,
            n_embd: raw.n_embd,
            n_layer: raw.n_layer,
            n_head: raw.n_head,
            n_inner: raw.n_inner.unwrap_or(4 * raw.n_embd),
            activation,
            activation_function: act_name,
            layer_norm_epsilon: raw.layer_norm_epsilon.unwrap_or(1e-5),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(true),
            scale_attn_weights: raw.scale_attn_weights.unwrap_or(true),
            scale_attn_by_inverse_layer_idx: raw.scale_attn_by_inverse_layer_idx.unwrap_or(false),
            bos_token_id: raw.bos_token_id,
            eos_token_ids: match raw.eos_token_id {
                None => vec![],
                Some(OneOrMany::One(id)) => vec![id],
                Some(OneOrMany::Many(ids)) => ids,
            },
            tokenizer_class: raw.tokenizer_class,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::invalid_file("config.json", reason));
        if self.n_layer == 0 || self.n_head == 0 || self.n_embd == 0 || self.vocab_size == 0 {
            return bad("n_layer, n_head, n_embd and vocab_size must all be positive".into());
        }
        if self.n_embd % self.n_head != 0 {
            return bad(format!("n_embd {} is not divisible by n_head {}", self.n_embd, self.n_head));
        }
        if self.n_positions == 0 || self.n_inner == 0 {
            return bad("n_positions and n_inner must be positive".into());
        }
        Ok(())
    }

    /// GPT-2 small (124M): 12 layers, 12 heads, 768 wide, 1024 positions, vocab 50257.
    pub fn gpt2_small() -> Self {
        Self::from_json(
            r#"{"model_type":"gpt2","vocab_size":50257,"n_positions":1024,"n_embd":768,"n_layer":12,
                "n_head":12,"activation_function":"gelu_new","bos_token_id":50256,"eos_token_id":50256}"#,
        )
        .expect("the GPT-2 small config is valid")
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Parameters of the model as HF counts them (tied lm_head counted once).
    pub fn parameter_count(&self) -> usize {
        let (e, i, l) = (self.n_embd, self.n_inner, self.n_layer);
        let per_layer = 2 * 2 * e /* ln_1, ln_2 */ + e * 3 * e + 3 * e /* c_attn */
            + e * e + e /* attn.c_proj */ + e * i + i /* c_fc */ + i * e + e /* mlp.c_proj */;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * e };
        self.vocab_size * e + self.n_positions * e + l * per_layer + 2 * e + head
    }

    /// The seed article's formula: 2 (K and V) x n_layer x n_embd x positions x batch x bytes.
    pub fn kv_cache_bytes(&self, positions: usize, batch: usize, bytes_per_element: usize) -> usize {
        2 * self.n_layer * self.n_embd * positions * batch * bytes_per_element
    }
}

/// The fields of `generation_config.json` that choose the default decoding.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct GenerationConfig {
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub max_new_tokens: Option<usize>,
}

impl GenerationConfig {
    /// Reads `generation_config.json` if the directory has one; none is not an error.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| Error::invalid_file(&path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(Error::invalid_file(&path, e)),
        }
    }
}
