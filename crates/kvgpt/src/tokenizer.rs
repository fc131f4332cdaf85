//! Text <-> token ids through the HF `tokenizers` crate. A model directory provides, in this
//! order: `tokenizer.json`; or `vocab.json` + `merges.txt` (GPT-2's byte-level BPE); or a BERT
//! WordPiece `vocab.txt` (`tokenizer_class: BertTokenizer`, as the Chinese GPT-2 checkpoints).

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

pub const TOKENIZER_FILES: [&str; 4] = ["tokenizer.json", "vocab.json", "merges.txt", "vocab.txt"];

/// Which files the tokenizer was built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerKind {
    TokenizerJson,
    ByteLevelBpe,
    WordPiece,
}

pub struct Tokenizer {
    inner: HfTokenizer,
    kind: TokenizerKind,
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::invalid_file(path, format!("cannot build the tokenizer: {e}"))
}

impl Tokenizer {
    /// Finds and loads the tokenizer files of a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            let inner = HfTokenizer::from_file(&json).map_err(|e| tok_err(&json, e))?;
            return Ok(Self { inner, kind: TokenizerKind::TokenizerJson });
        }
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if vocab.is_file() && merges.is_file() {
            return Self::byte_level_bpe(&vocab, &merges);
        }
        let vocab_txt = dir.join("vocab.txt");
        if vocab_txt.is_file() {
            return Self::wordpiece(&vocab_txt, lowercase_from_config(dir)?);
        }
        Err(Error::FileNotFound {
            what: "tokenizer",
            path: dir.to_path_buf(),
            hint: "expected tokenizer.json, or vocab.json + merges.txt, or vocab.txt; or pass token ids instead of text".into(),
        })
    }

    /// GPT-2's byte-level BPE, as `GPT2TokenizerFast` builds it: no prefix space, and
    /// `<|endoftext|>` parsed as a special token inside text.
    pub fn byte_level_bpe(vocab: &Path, merges: &Path) -> Result<Self> {
        let bpe = BPE::from_file(&path_str(vocab)?, &path_str(merges)?)
            .build()
            .map_err(|e| tok_err(vocab, e))?;
        let mut inner = HfTokenizer::new(bpe);
        let byte_level = ByteLevel::default().add_prefix_space(false);
        inner.with_pre_tokenizer(Some(byte_level));
        inner.with_decoder(Some(byte_level));
        inner.with_post_processor(Some(byte_level));
        if inner.token_to_id("<|endoftext|>").is_some() {
            inner
                .add_special_tokens([AddedToken::from("<|endoftext|>", true)])
                .map_err(|e| tok_err(vocab, e))?;
        }
        Ok(Self { inner, kind: TokenizerKind::ByteLevelBpe })
    }

    /// BERT WordPiece as `BertTokenizerFast` builds it from a `vocab.txt`.
    pub fn wordpiece(vocab: &Path, lowercase: bool) -> Result<Self> {
        let wp = WordPiece::from_file(&path_str(vocab)?)
            .unk_token("[UNK]".into())
            .build()
            .map_err(|e| tok_err(vocab, e))?;
        let mut inner = HfTokenizer::new(wp);
        inner
            .with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)))
            .map_err(|e| tok_err(vocab, e))?;
        inner.with_pre_tokenizer(Some(BertPreTokenizer));
        inner.with_decoder(Some(WordPieceDecoder::default()));
        let id = |t: &str| {
            inner.token_to_id(t).ok_or_else(|| tok_err(vocab, format!("vocab.txt has no {t} token")))
        };
        let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
        inner.with_post_processor(Some(BertProcessing::new(("[SEP]".into(), sep), ("[CLS]".into(), cls))));
        let specials: Vec<AddedToken> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            .iter()
            .filter(|t| inner.token_to_id(t).is_some())
            .map(|t| AddedToken::from(*t, true))
            .collect();
        inner.add_special_tokens(specials).map_err(|e| tok_err(vocab, e))?;
        Ok(Self { inner, kind: TokenizerKind::WordPiece })
    }

    pub fn kind(&self) -> &TokenizerKind {
        &self.kind
    }

    /// Ids of `text`. `add_special_tokens` adds what the tokenizer's post-processor adds
    /// ([CLS]/[SEP] for WordPiece; nothing for GPT-2). Generation uses `false`, as GPT-2 does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("cannot decode ids: {e}")))
    }

    /// Number of ids the tokenizer knows, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The crate's incremental decoder: it holds back bytes until they form whole UTF-8
    /// characters, so a streamed chunk never splits one.
    pub fn decode_stream(&self) -> TokenDecoder<'_> {
        TokenDecoder { inner: self.inner.decode_stream(false) }
    }
}

pub struct TokenDecoder<'a> {
    inner: tokenizers::tokenizer::DecodeStream<
        'a,
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >,
}

impl TokenDecoder<'_> {
    /// The text that `id` completes, or None while it is part of an unfinished character.
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.inner.step(id).map_err(|e| Error::Tokenizer(format!("cannot decode id {id}: {e}")))
    }
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| Error::invalid_file(p, "path is not valid UTF-8"))
}

/// `do_lower_case` from tokenizer_config.json (BertTokenizer's default is true).
fn lowercase_from_config(dir: &Path) -> Result<bool> {
    let path: PathBuf = dir.join("tokenizer_config.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::invalid_file(&path, e))?;
            Ok(v.get("do_lower_case").and_then(|b| b.as_bool()).unwrap_or(true))
        }
        Err(_) => Ok(true),
    }
}
