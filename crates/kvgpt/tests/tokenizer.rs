//! Tokenizers against HF's ids (test/fixtures/gpt2-tokenizer/cases.json and the zh model's
//! reference.json), and the text stream: no split UTF-8 characters, stop strings cut exactly.

mod common;
use common::*;
use kvgpt::engine::stream::TextStream;
use kvgpt::tokenizer::{Tokenizer, TokenizerKind};

fn gpt2_from_json() -> Tokenizer {
    let t = Tokenizer::from_dir(&fixture("gpt2-tokenizer")).unwrap();
    assert_eq!(t.kind(), &TokenizerKind::TokenizerJson);
    t
}

fn gpt2_from_vocab_merges() -> Tokenizer {
    let dir = fixture("gpt2-tokenizer");
    let t = Tokenizer::byte_level_bpe(&dir.join("vocab.json"), &dir.join("merges.txt")).unwrap();
    assert_eq!(t.kind(), &TokenizerKind::ByteLevelBpe);
    t
}

fn gpt2_cases() -> Vec<(String, Vec<u32>, String)> {
    let text = std::fs::read_to_string(fixture("gpt2-tokenizer").join("cases.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["text"].as_str().unwrap().to_string(), ids(&c["ids"]), c["decoded"].as_str().unwrap().to_string()))
        .collect()
}

fn check_gpt2_cases(tok: &Tokenizer, label: &str) {
    let cases = gpt2_cases();
    assert_eq!(cases.len(), 12, "cases.json changed");
    assert_eq!(tok.vocab_size(), 50257, "{label}");
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(50256), "{label}");
    for (text, expected_ids, decoded) in &cases {
        assert_eq!(&tok.encode(text, false).unwrap(), expected_ids, "{label}: ids of {text:?}");
        // GPT-2 has no post-processor template: special tokens add nothing.
        assert_eq!(&tok.encode(text, true).unwrap(), expected_ids, "{label}: ids (+special) of {text:?}");
        assert_eq!(&tok.decode(expected_ids, false).unwrap(), decoded, "{label}: decode of {text:?}");
    }
}

#[test]
fn gpt2_tokenizer_json_matches_hf() {
    check_gpt2_cases(&gpt2_from_json(), "tokenizer.json");
}

#[test]
fn gpt2_vocab_and_merges_match_hf() {
    check_gpt2_cases(&gpt2_from_vocab_merges(), "vocab.json + merges.txt");
}

#[test]
fn gpt2_skip_special_tokens_drops_endoftext() {
    let tok = gpt2_from_json();
    assert_eq!(tok.decode(&[64, 50256, 65], true).unwrap(), "ab");
    assert_eq!(tok.decode(&[64, 50256, 65], false).unwrap(), "a<|endoftext|>b");
}

#[test]
fn zh_wordpiece_matches_hf_tokenizer_cases() {
    let model = load("tiny-gpt2-zh");
    let tok = model.tokenizer().unwrap();
    assert_eq!(tok.kind(), &TokenizerKind::WordPiece);
    assert_eq!(tok.vocab_size(), 825);
    let reference = reference_json("tiny-gpt2-zh");
    let cases = reference["tokenizer_cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), ids(&c["ids_no_special"]), "{text:?} without specials");
        assert_eq!(tok.encode(text, true).unwrap(), ids(&c["ids_with_special"]), "{text:?} with [CLS]/[SEP]");
    }
    // [CLS] = 11, [SEP] = 12, [UNK] = 10 in this vocab.txt.
    assert_eq!((tok.token_to_id("[UNK]"), tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")), (Some(10), Some(11), Some(12)));
}

#[test]
fn zh_prompt_ids_and_greedy_text_match_reference() {
    // The reference built prompt ids as convert_tokens_to_ids(list(text)). Every character of
    // these prompts is its own vocab.txt entry and the BERT pre-tokenizer splits CJK characters
    // apart, so tokenize(prompt) gives the same ids for all of them.
    let model = load("tiny-gpt2-zh");
    let reference = reference_json("tiny-gpt2-zh");
    let prompts = reference["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 3);
    for p in prompts {
        let text = p["prompt"].as_str().unwrap();
        let input = ids(&p["input_ids"]);
        assert_eq!(input.len(), text.chars().count(), "one id per character of {text:?}");
        assert_eq!(model.tokenize(text).unwrap(), input, "tokenize({text:?})");
        // HF's decode of prompt + greedy ids: WordPiece joins tokens with spaces.
        let all: Vec<u32> = input.iter().chain(ids(&p["greedy_new_ids"]).iter()).copied().collect();
        assert_eq!(model.decode(&all).unwrap(), p["greedy_text"].as_str().unwrap(), "greedy_text of {text:?}");
    }
}

#[test]
fn gpt2_greedy_text_matches_reference() {
    // tiny-gpt2's greedy_text is HF's decode of prompt + greedy ids (one of them holds an
    // incomplete UTF-8 sequence, which decodes to U+FFFD like HF).
    let model = load("tiny-gpt2");
    let reference = reference_json("tiny-gpt2");
    for p in reference["prompts"].as_array().unwrap() {
        let input = ids(&p["input_ids"]);
        assert_eq!(model.tokenize(p["prompt"].as_str().unwrap()).unwrap(), input);
        let all: Vec<u32> = input.iter().chain(ids(&p["greedy_new_ids"]).iter()).copied().collect();
        assert_eq!(model.decode(&all).unwrap(), p["greedy_text"].as_str().unwrap());
    }
}

/// Pushes `ids` through a TextStream; returns each push's chunk (the flush at the end, when
/// no stop string was hit, is the last chunk), whether a stop string was hit, and the final text.
fn stream(tok: &Tokenizer, ids: &[u32], stops: &[&str]) -> (Vec<String>, bool, String) {
    let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
    let mut ts = TextStream::new(tok.decode_stream(), &stops);
    let mut chunks = Vec::new();
    let mut stopped = false;
    for &id in ids {
        let mut chunk = String::new();
        stopped = ts.push(id, &mut chunk).unwrap();
        chunks.push(chunk);
        if stopped {
            break;
        }
    }
    if !stopped {
        let mut chunk = String::new();
        ts.flush(&mut chunk);
        chunks.push(chunk);
    }
    (chunks, stopped, ts.into_text())
}

#[test]
fn streaming_never_splits_a_utf8_character() {
    let tok = gpt2_from_json();
    let text = "明天降温了 🙂 naïve — ok";
    let ids = tok.encode(text, false).unwrap();
    // Byte-level BPE: some ids are only part of a character; decoded alone they are U+FFFD.
    let partial = ids.iter().filter(|&&id| tok.decode(&[id], false).unwrap().contains('\u{FFFD}')).count();
    assert!(partial >= 4, "expected ids that are partial UTF-8 sequences, got {partial}");

    let (chunks, stopped, final_text) = stream(&tok, &ids, &[]);
    assert!(!stopped);
    assert_eq!(chunks.len(), ids.len() + 1);
    for (i, c) in chunks.iter().enumerate() {
        assert!(!c.contains('\u{FFFD}'), "chunk {i} {c:?} holds a replacement character");
    }
    // Some pushes complete no character and must give nothing yet.
    assert!(chunks.iter().filter(|c| c.is_empty()).count() >= partial / 2);
    assert_eq!(chunks.concat(), text);
    assert_eq!(final_text, text);
    assert_eq!(chunks.last().unwrap(), "", "nothing is held back without stop strings");
}

#[test]
fn stop_string_split_across_tokens_is_caught() {
    let tok = gpt2_from_json();
    let ids = tok.encode("Hello, my dog is cute", false).unwrap();
    assert_eq!(ids, [15496, 11, 616, 3290, 318, 13779]); // "Hello" "," " my" " dog" " is" " cute"
    let (chunks, stopped, text) = stream(&tok, &ids, &["dog is"]);
    assert!(stopped);
    // Of " dog" only the space is emitted: "dog" could start the stop string, and " is"
    // completes it, so "dog" is never shown.
    assert_eq!(chunks, ["Hello", ",", " my", " ", ""]);
    assert_eq!(text, "Hello, my ");
    assert_eq!(chunks.concat(), text);
}

#[test]
fn nothing_is_emitted_after_a_stop() {
    let tok = gpt2_from_json();
    let ids = tok.encode("Hello, my dog is cute", false).unwrap();
    let mut ts = TextStream::new(tok.decode_stream(), &[" my".to_string()]);
    let mut out = String::new();
    let hits: Vec<bool> = ids.iter().map(|&id| ts.push(id, &mut out).unwrap()).collect();
    assert_eq!(hits, [false, false, true, true, true, true]);
    ts.flush(&mut out);
    assert_eq!(out, "Hello,");
    assert_eq!(ts.into_text(), "Hello,");
}

#[test]
fn held_back_text_is_released_when_the_stop_does_not_follow() {
    let tok = gpt2_from_json();
    let text = "Hello, my dog is cute";
    let ids = tok.encode(text, false).unwrap();
    let (chunks, stopped, final_text) = stream(&tok, &ids, &["dog was", "cute!"]);
    assert!(!stopped);
    // "dog" waits for " was" and is released with " is"; "cute" waits for "!" until the
    // final flush releases it.
    assert_eq!(chunks, ["Hello", ",", " my", " ", "dog is", " ", "cute"]);
    assert_eq!(final_text, text);
    assert_eq!(chunks.concat(), text);
}

#[test]
fn earliest_stop_wins_and_multibyte_stops_work() {
    let tok = gpt2_from_json();
    let ids = tok.encode("明天降温了, it is cold", false).unwrap();
    // "降温" spans partial-byte tokens; "cold" comes later; the text ends before "降温".
    let (chunks, stopped, text) = stream(&tok, &ids, &["cold", "降温"]);
    assert!(stopped);
    assert_eq!(text, "明天");
    assert_eq!(chunks.concat(), "明天");
    assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')));
    // A stop string inside one token: the text ends before it.
    let (_, stopped, text) = stream(&tok, &ids, &["t i"]);
    assert!(stopped);
    assert_eq!(text, "明天降温了, i");
}
