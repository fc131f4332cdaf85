//! Resolves what `Model::load` is given: an existing directory, or a Hugging Face hub id such
//! as `openai-community/gpt2`, looked up in the HF cache (`HF_HUB_CACHE`, else `$HF_HOME/hub`,
//! else `~/.cache/huggingface/hub`; layout `models--org--name/snapshots/<rev>/`) and downloaded
//! with the `hf-hub` crate when it is missing and the hub is reachable.

use crate::error::{Error, Result};
use crate::tokenizer::TOKENIZER_FILES;
use crate::model::weights::WEIGHT_FILES;
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// Where a hub id's files live, and whether going online is allowed.
#[derive(Debug, Clone)]
pub struct HubSettings {
    pub cache_dir: PathBuf,
    pub offline: bool,
    pub revision: String,
}

impl HubSettings {
    /// Reads HF_HUB_CACHE, HF_HOME and HF_HUB_OFFLINE as the Python hub library does.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
            .or_else(|| var("HOME").map(|h| h.join(".cache").join("huggingface").join("hub")))
            .unwrap_or_else(|| PathBuf::from(".cache/huggingface/hub"));
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false);
        Self { cache_dir, offline, revision: "main".into() }
    }
}

/// Checks that `id` is `name` or `org/name` made of letters, digits, `-`, `_`, `.`, with no
/// `..`, no leading `.` or `-`, and no other path syntax.
pub fn validate_hub_id(id: &str) -> Result<()> {
    let bad = |reason: &str| Err(Error::InvalidModelId { id: id.to_string(), reason: reason.to_string() });
    let parts: Vec<&str> = id.split('/').collect();
    if id.is_empty() || parts.len() > 2 {
        return bad("a hub id is \"name\" or \"org/name\", and no directory of that name exists");
    }
    for part in parts {
        if part.is_empty() || part.len() > 96 {
            return bad("each part of a hub id is 1 to 96 characters");
        }
        if part.contains("..") || part.starts_with('.') || part.starts_with('-') {
            return bad("a hub id may not contain \"..\" or start a part with \".\" or \"-\"");
        }
        if !part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
            return bad("a hub id may contain only letters, digits, '-', '_' and '.'; no directory of that name exists");
        }
    }
    Ok(())
}

/// The directory holding a model's files: `model` itself if it is a directory, else the
/// snapshot of hub id `model` in the cache, downloaded first if needed and allowed.
pub fn resolve(model: &str, settings: &HubSettings) -> Result<PathBuf> {
    let as_path = Path::new(model);
    if as_path.is_dir() {
        return Ok(as_path.to_path_buf());
    }
    if as_path.exists() {
        return Err(Error::InvalidModelId {
            id: model.to_string(),
            reason: "this is a file; pass the directory that holds config.json".into(),
        });
    }
    validate_hub_id(model)?;
    let repo = Repo::with_revision(model.to_string(), RepoType::Model, settings.revision.clone());
    let cached = Cache::new(settings.cache_dir.clone()).repo(repo.clone());
    if let Some(config) = cached.get("config.json") {
        let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
        if has_weights_and_tokenizer(&dir) {
            return Ok(dir);
        }
    }
    let snapshot_hint = settings
        .cache_dir
        .join(format!("models--{}", model.replace('/', "--")))
        .join("snapshots")
        .join("<revision>");
    if settings.offline {
        return Err(Error::HubUnavailable {
            id: model.to_string(),
            dir: snapshot_hint,
            reason: "HF_HUB_OFFLINE is set and the model is not in the local cache".into(),
        });
    }
    download(model, repo, settings).map_err(|reason| Error::HubUnavailable {
        id: model.to_string(),
        dir: snapshot_hint,
        reason: format!("not in the local cache and the download failed ({reason})"),
    })
}

fn has_weights_and_tokenizer(dir: &Path) -> bool {
    let any = |names: &[&str]| names.iter().any(|n| dir.join(n).is_file());
    any(&WEIGHT_FILES) && any(&TOKENIZER_FILES)
}

/// Downloads config, weights and tokenizer into the cache; returns the snapshot directory.
fn download(model: &str, repo: Repo, settings: &HubSettings) -> std::result::Result<PathBuf, String> {
    let api = hf_hub::api::sync::ApiBuilder::from_cache(Cache::new(settings.cache_dir.clone()))
        .with_progress(false)
        .with_retries(1)
        .build()
        .map_err(|e| e.to_string())?
        .repo(repo);
    let config = api.get("config.json").map_err(|e| format!("config.json of {model}: {e}"))?;
    let weights_ok = ["model.safetensors", "pytorch_model.bin"].iter().any(|f| api.get(f).is_ok())
        || fetch_sharded(&api).is_ok();
    if !weights_ok {
        return Err(format!("{model} has none of {}", WEIGHT_FILES.join(", ")));
    }
    let tokenizer_ok = api.get("tokenizer.json").is_ok()
        || (api.get("vocab.json").is_ok() && api.get("merges.txt").is_ok())
        || api.get("vocab.txt").is_ok();
    if !tokenizer_ok {
        return Err(format!("{model} has no tokenizer files"));
    }
    for optional in ["generation_config.json", "tokenizer_config.json"] {
        let _ = api.get(optional); // absent in many repos
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

fn fetch_sharded(api: &hf_hub::api::sync::ApiRepo) -> std::result::Result<(), String> {
    let index = api.get("model.safetensors.index.json").map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(&index).map_err(|e| e.to_string())?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or("no weight_map")?;
    let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
    shards.sort_unstable();
    shards.dedup();
    for shard in shards {
        if Path::new(shard).file_name().map(|f| f != shard).unwrap_or(true) {
            return Err(format!("shard {shard:?} is not a plain file name"));
        }
        api.get(shard).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids() {
        for ok in ["gpt2", "openai-community/gpt2", "uer/gpt2-chinese-cluecorpussmall", "a_b.c/d-e"] {
            validate_hub_id(ok).unwrap();
        }
        for bad in ["", "../x", "a/../b", "/etc/passwd", "a/b/c", "a\\b", ".hidden", "-x", "a/..", "a b", "a/"] {
            assert_eq!(validate_hub_id(bad).unwrap_err().code(), "KVGPT_INVALID_MODEL_ID", "{bad}");
        }
    }
}
