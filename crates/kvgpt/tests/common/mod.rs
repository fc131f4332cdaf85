//! Shared by the integration tests: fixture paths and reference readers.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use kvgpt::{DeviceKind, GenerateOptions, Generation, LoadOptions, Model, WeightDType};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

/// test/fixtures/<name>, or under KVGPT_FIXTURES (for test binaries run away from the checkout).
pub fn fixture(name: &str) -> PathBuf {
    match std::env::var_os("KVGPT_FIXTURES") {
        Some(dir) => PathBuf::from(dir).join(name),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../test/fixtures").join(name),
    }
}

/// models/<name>, the models bundled with the repository (or under KVGPT_MODELS).
pub fn bundled(name: &str) -> PathBuf {
    match std::env::var_os("KVGPT_MODELS") {
        Some(dir) => PathBuf::from(dir).join(name),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models").join(name),
    }
}

/// The device the model tests run on: KVGPT_TEST_DEVICE ('cpu', 'cuda', 'auto'), CPU when unset.
/// `KVGPT_TEST_DEVICE=cuda cargo test --features cuda` runs the parity suite on a GPU.
pub fn test_device() -> DeviceKind {
    DeviceKind::parse(&std::env::var("KVGPT_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())).unwrap()
}

pub fn load(name: &str) -> Model {
    load_as(name, WeightDType::F32)
}

pub fn load_as(name: &str, dtype: WeightDType) -> Model {
    let opts = LoadOptions { device: test_device(), dtype, hub: None };
    Model::load(fixture(name).to_str().unwrap(), &opts).unwrap()
}

pub fn reference_json(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn reference_logits(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu).unwrap()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// max |a - b|, on the CPU (either may live on a GPU).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (a.to_device(&Device::Cpu).unwrap(), b.to_device(&Device::Cpu).unwrap());
    (&a - &b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

pub fn greedy(max_new_tokens: usize, use_cache: bool) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        sampling: Default::default(),
        stop: vec![],
        ignore_eos: true,
        use_cache,
        logprobs: None,
    }
}

pub fn run(model: &Model, prompt: &[u32], opts: &GenerateOptions) -> Generation {
    model.generate(prompt, opts, &AtomicBool::new(false), &mut |_| {}).unwrap()
}

/// A directory under the system temp dir, unique per process and call, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("kvgpt-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies `files` of fixture `name` into `dest` (created if needed).
pub fn copy_fixture_files(name: &str, files: &[&str], dest: &std::path::Path) {
    std::fs::create_dir_all(dest).unwrap();
    for f in files {
        std::fs::copy(fixture(name).join(f), dest.join(f)).unwrap();
    }
}

/// Greedy ids of prompt `i` in a fixture's reference.json, with that prompt's input ids.
pub fn reference_prompt(name: &str, i: usize) -> (Vec<u32>, Vec<u32>) {
    let r = reference_json(name);
    let p = &r["prompts"][i];
    (ids(&p["input_ids"]), ids(&p["greedy_new_ids"]))
}
