//! Loading by hub id from an HF cache laid out as huggingface_hub writes it, offline; the hub
//! settings from the environment; model ids that try path tricks; and broken model directories.

mod common;
use common::*;
use kvgpt::{HubSettings, LoadOptions, Model};
use std::path::Path;

const HUB_ID: &str = "openai-community/gpt2";
const COMMIT: &str = "607a30d783dfa663caf39e06633721c8d4cfcd7e";
const TINY_FILES: [&str; 4] = ["config.json", "model.safetensors", "tokenizer.json", "generation_config.json"];

fn offline(cache_dir: &Path) -> LoadOptions {
    LoadOptions {
        hub: Some(HubSettings { cache_dir: cache_dir.to_path_buf(), offline: true, revision: "main".into() }),
        ..Default::default()
    }
}

/// Loads `model` with an offline hub over an empty cache, so nothing can be found or fetched
/// through the hub; returns the error.
fn load_err(model: &str) -> kvgpt::Error {
    let cache = TempDir::new("empty-cache");
    match Model::load(model, &offline(cache.path())) {
        Ok(_) => panic!("{model:?} loaded"),
        Err(e) => e,
    }
}

/// A model directory holding tiny-gpt2's files, with `edit` applied to it.
fn broken_dir(tag: &str, edit: impl FnOnce(&Path)) -> TempDir {
    let dir = TempDir::new(tag);
    copy_fixture_files("tiny-gpt2", &TINY_FILES, dir.path());
    edit(dir.path());
    dir
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut config);
    std::fs::write(path, config.to_string()).unwrap();
}

#[test]
fn loads_a_hub_id_from_the_offline_cache() {
    let cache = TempDir::new("hub-cache");
    let repo = cache.path().join("models--openai-community--gpt2");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap(); // as huggingface_hub writes it: no newline
    let snapshot = repo.join("snapshots").join(COMMIT);
    copy_fixture_files("tiny-gpt2", &TINY_FILES, &snapshot);

    let model = Model::load(HUB_ID, &offline(cache.path())).unwrap();
    assert_eq!(model.info().dir, snapshot);
    assert_eq!(model.info().weights_file, snapshot.join("model.safetensors"));
    assert_eq!(model.config().n_embd, 32);
    let (prompt, expected) = reference_prompt("tiny-gpt2", 0);
    assert_eq!(run(&model, &prompt, &greedy(40, true)).tokens, expected);
    assert_eq!(model.tokenize("Hello, my dog is cute").unwrap(), prompt);

    // Another revision is not in the cache: offline, that is an error, not a fallback to main.
    let other = LoadOptions {
        hub: Some(HubSettings { cache_dir: cache.path().to_path_buf(), offline: true, revision: "v2".into() }),
        ..Default::default()
    };
    assert_eq!(Model::load(HUB_ID, &other).err().unwrap().code(), "KVGPT_HUB_UNAVAILABLE");
}

#[test]
fn a_cached_snapshot_without_weights_is_not_used() {
    let cache = TempDir::new("hub-partial");
    let repo = cache.path().join("models--openai-community--gpt2");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    copy_fixture_files("tiny-gpt2", &["config.json", "tokenizer.json"], &repo.join("snapshots").join(COMMIT));
    let e = Model::load(HUB_ID, &offline(cache.path())).err().unwrap();
    assert_eq!(e.code(), "KVGPT_HUB_UNAVAILABLE");
}

#[test]
fn nothing_cached_and_offline_is_hub_unavailable() {
    let e = load_err(HUB_ID);
    assert_eq!(e.code(), "KVGPT_HUB_UNAVAILABLE");
    let msg = e.to_string();
    let expected_dir = Path::new("models--openai-community--gpt2").join("snapshots");
    assert!(msg.contains(expected_dir.to_str().unwrap()), "{msg}");
    assert!(msg.contains("HF_HUB_OFFLINE"), "{msg}");
}

#[test]
fn hub_settings_from_env() {
    // The only test that touches these variables; the others pass HubSettings explicitly.
    let saved: Vec<_> = ["HF_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE"].iter().map(|k| (*k, std::env::var_os(k))).collect();
    std::env::set_var("HF_HUB_CACHE", "/tmp/kvgpt-hub-cache");
    std::env::set_var("HF_HOME", "/tmp/kvgpt-hf-home");
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let s = HubSettings::from_env();
    assert_eq!(s.cache_dir, Path::new("/tmp/kvgpt-hub-cache"), "HF_HUB_CACHE wins over HF_HOME");
    assert!(s.offline);
    assert_eq!(s.revision, "main");

    std::env::remove_var("HF_HUB_CACHE");
    std::env::set_var("HF_HUB_OFFLINE", "0");
    let s = HubSettings::from_env();
    assert_eq!(s.cache_dir, Path::new("/tmp/kvgpt-hf-home/hub"));
    assert!(!s.offline);

    std::env::set_var("HF_HUB_CACHE", ""); // empty counts as unset
    std::env::set_var("HF_HUB_OFFLINE", "TRUE");
    let s = HubSettings::from_env();
    assert_eq!(s.cache_dir, Path::new("/tmp/kvgpt-hf-home/hub"));
    assert!(s.offline);

    for (k, v) in saved {
        match v {
            Some(v) => std::env::set_var(k, v),
            None => std::env::remove_var(k),
        }
    }
}

#[test]
fn path_tricks_are_invalid_model_ids() {
    // "/etc/passwd" exists but is a file; the others do not exist and are not hub ids.
    for id in ["../x", "/etc/passwd", "a/../../b", "a/b/c", "~/models", "C:\\x", ""] {
        let e = load_err(id);
        assert_eq!(e.code(), "KVGPT_INVALID_MODEL_ID", "{id:?}: {e}");
    }
}

#[test]
fn a_directory_with_only_config_has_no_weights() {
    let dir = TempDir::new("only-config");
    copy_fixture_files("tiny-gpt2", &["config.json"], dir.path());
    let e = load_err(dir.path().to_str().unwrap());
    assert_eq!(e.code(), "KVGPT_FILE_NOT_FOUND");
    let msg = e.to_string();
    assert!(msg.starts_with("weights not found"), "{msg}");
    assert!(msg.contains("model.safetensors") && msg.contains("pytorch_model.bin"), "{msg}");
}

#[test]
fn a_directory_without_config_is_file_not_found() {
    let dir = broken_dir("no-config", |d| std::fs::remove_file(d.join("config.json")).unwrap());
    let e = load_err(dir.path().to_str().unwrap());
    assert_eq!(e.code(), "KVGPT_FILE_NOT_FOUND");
    assert!(e.to_string().contains("config.json"), "{e}");
}

#[test]
fn malformed_config_is_invalid_file() {
    let dir = broken_dir("bad-json", |d| std::fs::write(d.join("config.json"), "{\"n_embd\": 32,").unwrap());
    let e = load_err(dir.path().to_str().unwrap());
    assert_eq!(e.code(), "KVGPT_INVALID_FILE");
    assert!(e.to_string().contains(dir.path().join("config.json").to_str().unwrap()), "{e}");
}

#[test]
fn bert_config_is_unsupported() {
    let dir = broken_dir("bert", |d| edit_config(d, |c| c["model_type"] = "bert".into()));
    let e = load_err(dir.path().to_str().unwrap());
    assert_eq!(e.code(), "KVGPT_UNSUPPORTED_MODEL");
    assert!(e.to_string().contains("\"bert\""), "{e}");
}

#[test]
fn config_disagreeing_with_weights_is_a_mismatch() {
    let dir = broken_dir("n-embd", |d| edit_config(d, |c| c["n_embd"] = 64.into()));
    let e = load_err(dir.path().to_str().unwrap());
    assert_eq!(e.code(), "KVGPT_WEIGHTS_MISMATCH");
    assert!(e.to_string().contains("config.json implies"), "{e}");

    let dir = broken_dir("vocab", |d| edit_config(d, |c| c["vocab_size"] = 50000.into()));
    assert_eq!(load_err(dir.path().to_str().unwrap()).code(), "KVGPT_WEIGHTS_MISMATCH");
}

#[test]
fn truncated_safetensors_is_invalid_file() {
    let dir = broken_dir("truncated", |d| {
        let path = d.join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..1000]).unwrap();
    });
    let e = load_err(dir.path().to_str().unwrap());
    assert_eq!(e.code(), "KVGPT_INVALID_FILE");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn a_directory_without_tokenizer_loads_for_ids_and_refuses_text() {
    let dir = broken_dir("no-tokenizer", |d| std::fs::remove_file(d.join("tokenizer.json")).unwrap());
    let model = Model::load(dir.path().to_str().unwrap(), &offline(dir.path())).unwrap();
    let (prompt, expected) = reference_prompt("tiny-gpt2", 0);
    let g = run(&model, &prompt, &greedy(40, true));
    assert_eq!((g.tokens, g.text), (expected, None), "ids in, ids out, no text");
    let e = model.tokenize("Hello").unwrap_err();
    assert_eq!(e.code(), "KVGPT_TOKENIZER");
    assert!(e.to_string().contains("pass token ids instead of text"), "{e}");
    assert_eq!(model.decode(&prompt).unwrap_err().code(), "KVGPT_TOKENIZER");
}

#[test]
fn a_corrupt_tokenizer_json_is_invalid_file() {
    let dir = broken_dir("bad-tokenizer", |d| std::fs::write(d.join("tokenizer.json"), "{\"model\": 5").unwrap());
    let e = load_err(dir.path().to_str().unwrap());
    assert_eq!(e.code(), "KVGPT_INVALID_FILE");
    assert!(e.to_string().contains("tokenizer.json") && e.to_string().contains("cannot build the tokenizer"), "{e}");
}

#[test]
fn the_fixture_directory_loads_as_a_path() {
    // The control for the cases above: the unmodified copy loads and runs.
    let dir = broken_dir("intact", |_| {});
    let model = Model::load(dir.path().to_str().unwrap(), &offline(dir.path())).unwrap();
    let (prompt, expected) = reference_prompt("tiny-gpt2", 3);
    assert_eq!(run(&model, &prompt, &greedy(40, true)).tokens, expected);
}
