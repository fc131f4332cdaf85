//! `Model::generate` on tiny-gpt2: seeded sampling, stop strings, abort, EOS, the context
//! limit, option and input errors, two threads sharing one model, and the timings.

mod common;
use common::*;
use kvgpt::{GenerateOptions, Generation, Model, Prompt, SamplingParams, StopReason};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const N_POSITIONS: usize = 128;

/// Generation plus every (id, text) the callback saw.
fn generate_events(model: &Model, prompt: &[u32], opts: &GenerateOptions) -> (Generation, Vec<(u32, String)>) {
    let mut events = Vec::new();
    let g = model
        .generate(prompt, opts, &AtomicBool::new(false), &mut |e| events.push((e.token, e.text.to_string())))
        .unwrap();
    (g, events)
}

/// The error code of a generation that must fail, and how many times on_token was called.
fn generate_err(model: &Model, prompt: &[u32], opts: &GenerateOptions) -> (&'static str, usize) {
    let mut calls = 0;
    let e = model.generate(prompt, opts, &AtomicBool::new(false), &mut |_| calls += 1).unwrap_err();
    (e.code(), calls)
}

fn sampled(seed: u64, max_new_tokens: usize, use_cache: bool) -> GenerateOptions {
    GenerateOptions {
        sampling: SamplingParams { temperature: 0.8, top_k: 40, top_p: 0.9, repetition_penalty: 1.0, seed: Some(seed) },
        ..greedy(max_new_tokens, use_cache)
    }
}

/// Checks what every generation must satisfy: the events are the tokens, their texts add up
/// to the returned text, and the token counts in the timings.
fn check_consistent(g: &Generation, events: &[(u32, String)], prompt_len: usize) {
    assert_eq!(events.iter().map(|e| e.0).collect::<Vec<_>>(), g.tokens);
    let streamed: String = events.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(Some(streamed), g.text);
    assert_eq!(g.timings.generated_tokens, g.tokens.len());
    assert_eq!(g.timings.prompt_tokens, prompt_len);
}

/// `n` valid ids: the reference prompt 0 repeated.
fn long_prompt(n: usize) -> Vec<u32> {
    let (p0, _) = reference_prompt("tiny-gpt2", 0);
    p0.iter().cycle().take(n).copied().collect()
}

#[test]
fn greedy_generate_matches_reference_with_events() {
    let model = load("tiny-gpt2");
    let (prompt, expected) = reference_prompt("tiny-gpt2", 0);
    let (g, events) = generate_events(&model, &prompt, &greedy(40, true));
    assert_eq!(g.tokens, expected);
    assert_eq!(g.stop_reason, StopReason::MaxNewTokens);
    check_consistent(&g, &events, prompt.len());
    let reference = reference_json("tiny-gpt2");
    let full = reference["prompts"][0]["greedy_text"].as_str().unwrap();
    let new_text = full.strip_prefix("Hello, my dog is cute").unwrap();
    assert_eq!(g.text.as_deref(), Some(new_text));
}

#[test]
fn seeded_sampling_repeats_and_depends_on_the_seed() {
    let model = load("tiny-gpt2");
    let (prompt, greedy_ids) = reference_prompt("tiny-gpt2", 0);
    let a = run(&model, &prompt, &sampled(1234, 40, true));
    let b = run(&model, &prompt, &sampled(1234, 40, true));
    let c = run(&model, &prompt, &sampled(4321, 40, true));
    assert_eq!(a.tokens.len(), 40);
    assert_eq!(a.tokens, b.tokens, "same seed, same tokens");
    assert_eq!(a.text, b.text);
    assert_ne!(a.tokens, c.tokens, "another seed, other tokens");
    assert_ne!(a.tokens, greedy_ids, "temperature 0.8 is not greedy");
}

#[test]
fn sampling_is_the_same_with_and_without_the_cache() {
    let model = load("tiny-gpt2");
    for i in [0, 2] {
        let (prompt, _) = reference_prompt("tiny-gpt2", i);
        let on = run(&model, &prompt, &sampled(99, 40, true));
        let off = run(&model, &prompt, &sampled(99, 40, false));
        assert_eq!(on.tokens, off.tokens, "prompt {i}");
        assert_eq!(off.cache_bytes, 0);
        assert!(on.cache_bytes > 0);
    }
}

#[test]
fn stop_string_ends_the_text_before_it() {
    let model = load("tiny-gpt2");
    let (prompt, expected) = reference_prompt("tiny-gpt2", 0);
    let reference = reference_json("tiny-gpt2");
    let full = reference["prompts"][0]["greedy_text"].as_str().unwrap();
    let new_text = full.strip_prefix("Hello, my dog is cute").unwrap();
    let stop = " Gould";
    let cut = new_text.find(stop).unwrap();
    assert!(cut > 0);
    let opts = GenerateOptions { stop: vec![stop.into(), "never appears".into()], ..greedy(40, true) };
    let (g, events) = generate_events(&model, &prompt, &opts);
    assert_eq!(g.stop_reason, StopReason::StopString);
    assert_eq!(g.text.as_deref(), Some(&new_text[..cut]));
    assert_eq!(&new_text[..cut], " guides meg obedient obedient 157 prof Objective tips Downloads");
    // " Gould" is the 10th id; it is returned (it was generated) but its text is not.
    assert_eq!(g.tokens, expected[..10]);
    assert_eq!(model.decode(&g.tokens[9..]).unwrap(), stop);
    check_consistent(&g, &events, prompt.len());
}

#[test]
fn abort_from_the_callback_stops_before_the_next_token() {
    // The engine checks the flag before each forward pass (and after sampling each token,
    // before its event): a flag set in the 5th event is seen before the 6th token is computed,
    // so 5 tokens come back, each streamed with its text.
    let model = load("tiny-gpt2");
    let (prompt, expected) = reference_prompt("tiny-gpt2", 0);
    let abort = AtomicBool::new(false);
    let mut events = Vec::new();
    let g = model
        .generate(&prompt, &greedy(40, true), &abort, &mut |e| {
            events.push((e.token, e.text.to_string()));
            if events.len() == 5 {
                abort.store(true, Ordering::Relaxed);
            }
        })
        .unwrap();
    assert_eq!(g.stop_reason, StopReason::Aborted);
    assert_eq!(g.tokens.len(), 5);
    assert_eq!(g.tokens, expected[..5]);
    check_consistent(&g, &events, prompt.len());
    assert_eq!(g.text, Some(model.decode(&expected[..5]).unwrap()));
}

#[test]
fn abort_before_the_call_generates_nothing() {
    let model = load("tiny-gpt2");
    let (prompt, _) = reference_prompt("tiny-gpt2", 0);
    let mut calls = 0;
    let g = model.generate(&prompt, &greedy(40, true), &AtomicBool::new(true), &mut |_| calls += 1).unwrap();
    assert_eq!(g.stop_reason, StopReason::Aborted);
    assert!(g.tokens.is_empty());
    assert_eq!(calls, 0);
    assert_eq!(g.text.as_deref(), Some(""));
    assert_eq!(g.timings.prefill_ms, 0.0, "no forward pass");
}

#[test]
fn eos_stops_unless_ignored() {
    // No reference greedy chain of tiny-gpt2 hits its EOS (50256), so the same weights are
    // loaded with a config.json whose eos_token_id is the 3rd greedy id of prompt 0.
    let (prompt, expected) = reference_prompt("tiny-gpt2", 0);
    assert!(!expected.contains(&50256));
    let real = load("tiny-gpt2");
    let g = real.generate(&prompt, &GenerateOptions { ignore_eos: false, ..greedy(40, true) }, &AtomicBool::new(false), &mut |_| {}).unwrap();
    assert_eq!((g.stop_reason, g.tokens.clone()), (StopReason::MaxNewTokens, expected.clone()));

    let eos = expected[2]; // 41652 " obedient"
    let tmp = TempDir::new("eos");
    copy_fixture_files("tiny-gpt2", &["model.safetensors", "tokenizer.json", "generation_config.json"], tmp.path());
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-gpt2").join("config.json")).unwrap()).unwrap();
    config["eos_token_id"] = serde_json::json!([eos, 7]);
    std::fs::write(tmp.path().join("config.json"), config.to_string()).unwrap();
    let model = Model::load(tmp.path().to_str().unwrap(), &Default::default()).unwrap();
    assert_eq!(model.config().eos_token_ids, [eos, 7]);

    let (g, events) = generate_events(&model, &prompt, &GenerateOptions { ignore_eos: false, ..greedy(40, true) });
    assert_eq!(g.stop_reason, StopReason::Eos);
    assert_eq!(g.tokens, expected[..3], "the EOS that stopped generation is the last id");
    assert_eq!(g.text, Some(model.decode(&expected[..2]).unwrap()), "the text leaves the EOS out");
    assert_eq!(events.last().unwrap(), &(eos, String::new()));
    check_consistent(&g, &events, prompt.len());

    let g = run(&model, &prompt, &greedy(40, true)); // ignore_eos: true
    assert_eq!((g.stop_reason, g.tokens), (StopReason::MaxNewTokens, expected));
}

#[test]
fn max_new_tokens_zero_generates_nothing() {
    let model = load("tiny-gpt2");
    let (prompt, _) = reference_prompt("tiny-gpt2", 1);
    let (g, events) = generate_events(&model, &prompt, &greedy(0, true));
    assert_eq!(g.stop_reason, StopReason::MaxNewTokens);
    assert!(g.tokens.is_empty() && events.is_empty());
    assert_eq!(g.text.as_deref(), Some(""));
    assert_eq!(g.cache_bytes, 0, "no cache for no tokens");
    assert_eq!(g.timings.prompt_tokens, prompt.len());
}

#[test]
fn context_full_after_the_last_position() {
    // Tokens are sampled while history.len() <= n_positions before feeding: 120 + k > 128
    // first holds for k = 9, the token sampled from the logits of position 127.
    let model = load("tiny-gpt2");
    assert_eq!(model.config().n_positions, N_POSITIONS);
    let prompt = long_prompt(120);
    let mut results = Vec::new();
    for use_cache in [true, false] {
        let (g, events) = generate_events(&model, &prompt, &greedy(50, use_cache));
        assert_eq!(g.stop_reason, StopReason::ContextFull, "use_cache={use_cache}");
        assert_eq!(g.tokens.len(), 9);
        check_consistent(&g, &events, 120);
        results.push(g);
    }
    assert_eq!(results[0].tokens, results[1].tokens, "cache on and off agree up to the last position");
    assert_eq!(results[0].cache_bytes, 2 * 2 * 32 * N_POSITIONS * 4, "capacity clamped to n_positions");
    assert_eq!(results[0].timings.step_ms.len(), 8);

    // A prompt filling the context still yields one token; max_new_tokens wins when it is hit first.
    let g = run(&model, &long_prompt(128), &greedy(50, true));
    assert_eq!((g.stop_reason, g.tokens.len()), (StopReason::ContextFull, 1));
    let g = run(&model, &prompt, &greedy(9, true));
    assert_eq!((g.stop_reason, g.tokens.len()), (StopReason::MaxNewTokens, 9));
    assert_eq!(g.tokens, results[0].tokens);
}

#[test]
fn prompt_longer_than_the_context_is_invalid() {
    let model = load("tiny-gpt2");
    let (code, calls) = generate_err(&model, &long_prompt(129), &greedy(5, true));
    assert_eq!((code, calls), ("KVGPT_INVALID_INPUT", 0));
}

#[test]
fn empty_prompt_starts_from_bos() {
    let model = load("tiny-gpt2");
    let (bos_prompt, expected) = reference_prompt("tiny-gpt2", 4);
    assert_eq!(bos_prompt, [50256]);
    let (g, events) = generate_events(&model, &[], &greedy(40, true));
    assert_eq!(g.tokens, expected);
    check_consistent(&g, &events, 1);
    assert_eq!(run(&model, &bos_prompt, &greedy(40, true)).tokens, expected);
}

#[test]
fn ids_outside_the_vocabulary_are_invalid_input() {
    let model = load("tiny-gpt2");
    for prompt in [vec![50257], vec![15496, 11, 60000], vec![u32::MAX]] {
        assert_eq!(generate_err(&model, &prompt, &greedy(5, true)), ("KVGPT_INVALID_INPUT", 0), "{prompt:?}");
    }
    assert_eq!(model.decode(&[50257]).unwrap_err().code(), "KVGPT_INVALID_INPUT");
    // The last id of the vocabulary is fine.
    assert_eq!(run(&model, &[50256], &greedy(1, true)).tokens.len(), 1);
}

#[test]
fn out_of_range_options_fail_before_any_work() {
    let model = load("tiny-gpt2");
    let (prompt, _) = reference_prompt("tiny-gpt2", 0);
    let base = greedy(5, true);
    let with = |f: &dyn Fn(&mut GenerateOptions)| {
        let mut o = base.clone();
        f(&mut o);
        o
    };
    let bad = [
        with(&|o| o.sampling.temperature = -1.0),
        with(&|o| o.sampling.temperature = f64::NAN),
        with(&|o| o.sampling.top_p = 0.0),
        with(&|o| o.sampling.top_p = 1.5),
        with(&|o| o.sampling.repetition_penalty = 0.0),
        with(&|o| o.stop = vec!["ok".into(), String::new()]),
        with(&|o| o.max_new_tokens = kvgpt::engine::generate::MAX_NEW_TOKENS_LIMIT + 1),
    ];
    for opts in &bad {
        assert_eq!(generate_err(&model, &prompt, opts), ("KVGPT_OPTION_RANGE", 0), "{opts:?}");
        // Options are checked before the prompt: a bad prompt still reports the option.
        assert_eq!(generate_err(&model, &[u32::MAX], opts).0, "KVGPT_OPTION_RANGE");
    }
    // check_generation finds the same, on this thread, without queueing anything.
    for opts in &bad {
        assert_eq!(model.check_generation(Prompt::Ids(prompt.clone()), opts).unwrap_err().code(), "KVGPT_OPTION_RANGE");
    }
    for bad_prompt in [long_prompt(129), vec![50257]] {
        assert_eq!(model.check_generation(Prompt::Ids(bad_prompt), &base).unwrap_err().code(), "KVGPT_INVALID_INPUT");
    }
    assert_eq!(model.check_generation(Prompt::Ids(vec![]), &base).unwrap(), [50256]);
    assert_eq!(model.check_generation(Prompt::Text("Hello world".into()), &base).unwrap(), model.tokenize("Hello world").unwrap());
    // The limits themselves are allowed.
    let edge = with(&|o| {
        o.sampling = SamplingParams { temperature: 100.0, top_k: 1, top_p: 1.0, repetition_penalty: 100.0, seed: Some(1) };
    });
    assert_eq!(run(&model, &prompt, &edge).tokens.len(), 5);
}

#[test]
fn two_threads_share_one_model() {
    let model = Arc::new(load("tiny-gpt2"));
    let (p0, g0) = reference_prompt("tiny-gpt2", 0);
    let (p1, _) = reference_prompt("tiny-gpt2", 1);
    let jobs = [(p0.clone(), greedy(40, true)), (p1.clone(), sampled(7, 40, true))];
    let sequential: Vec<Vec<u32>> = jobs.iter().map(|(p, o)| run(&model, p, o).tokens).collect();
    assert_eq!(sequential[0], g0);
    for _ in 0..3 {
        let handles: Vec<_> = jobs
            .iter()
            .cloned()
            .map(|(p, o)| {
                let m = Arc::clone(&model);
                std::thread::spawn(move || run(&m, &p, &o).tokens)
            })
            .collect();
        let parallel: Vec<Vec<u32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(parallel, sequential);
    }
}

#[test]
fn timings_and_cache_bytes() {
    let model = load("tiny-gpt2");
    let (prompt, expected) = reference_prompt("tiny-gpt2", 1);
    let cfg = model.config().clone();
    let bytes = |capacity: usize| 2 * cfg.n_layer * cfg.n_embd * capacity * 4;
    for use_cache in [true, false] {
        let g = run(&model, &prompt, &greedy(12, use_cache));
        assert_eq!(g.tokens, expected[..12]);
        let t = &g.timings;
        assert_eq!((t.prompt_tokens, t.generated_tokens), (8, 12));
        assert_eq!(t.step_ms.len(), 11, "one forward per token after the first");
        assert!(t.prefill_ms > 0.0);
        assert!(t.step_ms.iter().all(|&s| s > 0.0));
        let sum: f64 = t.step_ms.iter().sum();
        assert!((t.decode_ms - sum).abs() < 1e-6 * sum.max(1.0), "decode_ms {} vs sum {sum}", t.decode_ms);
        assert!(t.ttft_ms >= t.prefill_ms && t.total_ms >= t.ttft_ms + t.decode_ms);
        assert!(t.sample_ms > 0.0 && t.sample_ms <= t.total_ms);
        assert_eq!(g.cache_bytes, if use_cache { bytes(8 + 12) } else { 0 });
    }
    assert_eq!(bytes(20), 2 * 2 * 32 * 20 * 4);
    assert_eq!(model.info().cache_bytes_per_token, bytes(1));
    // Stopped by a stop string the count of steps is still tokens - 1.
    let g = run(&model, &prompt, &GenerateOptions { stop: vec!["157".into()], ..greedy(40, true) });
    assert_eq!(g.stop_reason, StopReason::StopString);
    assert_eq!(g.timings.step_ms.len(), g.tokens.len() - 1);
    assert_eq!(g.cache_bytes, bytes(8 + 40));
}
