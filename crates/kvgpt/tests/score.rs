//! Scoring against HF transformers: the loss and perplexity of every reference prompt (HF's
//! `labels=input_ids`), each token's log-probability against log_softmax of HF's logits, the
//! sliding-window perplexity of HF's perplexity guide (test/fixtures/sliding), scores batched
//! with each other and with generations equal to solo ones, generation logprobs equal to the
//! scored sequence's, and bad input as typed errors.

mod common;
use candle_core::D;
use common::*;
use kvgpt::engine::scheduler::{Abort, GenerateRequest, Request, ScoreRequest};
use kvgpt::{EngineOptions, GenerateOptions, Model, Prompt, SamplingParams, Scheduler, Score, ScoreOptions};
use std::cell::RefCell;
use std::sync::atomic::AtomicBool;

fn score(model: &Model, text: Prompt, opts: &ScoreOptions) -> kvgpt::Result<Score> {
    model.score(text, opts, &AtomicBool::new(false))
}

fn tol(model: &Model) -> f64 {
    if model.gpt2().device().is_cpu() {
        1e-4
    } else {
        1e-3
    }
}

#[test]
fn loss_and_perplexity_equal_hf() {
    for name in ["tiny-gpt2", "tiny-gpt2-zh"] {
        let model = load(name);
        let reference = reference_json(name);
        for (i, p) in reference["prompts"].as_array().unwrap().iter().enumerate() {
            let prompt = ids(&p["input_ids"]);
            if prompt.len() < 2 {
                continue;
            }
            let s = score(&model, Prompt::Ids(prompt.clone()), &ScoreOptions::default()).unwrap();
            let (loss, ppl) = (p["loss"].as_f64().unwrap(), p["perplexity"].as_f64().unwrap());
            assert!((s.nll - loss).abs() < tol(&model), "{name} prompt{i}: nll {} vs HF loss {loss}", s.nll);
            assert!(((s.perplexity - ppl) / ppl).abs() < tol(&model), "{name} prompt{i}: perplexity {} vs HF {ppl}", s.perplexity);
            assert_eq!(s.tokens.len(), prompt.len() - 1);
            assert_eq!(s.windows, 1);
            let positions: Vec<usize> = s.tokens.iter().map(|t| t.position).collect();
            assert_eq!(positions, (1..prompt.len()).collect::<Vec<_>>());
            assert!(s.tokens.iter().zip(&prompt[1..]).all(|(t, &id)| t.logprob.id == id));
        }
    }
}

#[test]
fn token_logprobs_equal_log_softmax_of_hf_logits() {
    let name = "tiny-gpt2";
    let model = load(name);
    let reference = reference_json(name);
    let prompt = ids(&reference["prompts"][0]["input_ids"]);
    let logits = &reference_logits(name)["prompt0.logits_all"]; // (T, vocab)
    let lsm = candle_nn::ops::log_softmax(logits, D::Minus1).unwrap();
    let s = score(&model, Prompt::Ids(prompt.clone()), &ScoreOptions { logprobs: 5, ..Default::default() }).unwrap();
    for t in &s.tokens {
        let row: Vec<f32> = lsm.get(t.position - 1).unwrap().to_vec1().unwrap();
        let want = row[prompt[t.position] as usize];
        assert!(((t.logprob.logprob - want) as f64).abs() < tol(&model), "position {}: {} vs {want}", t.position, t.logprob.logprob);
        // The alternatives: HF's five largest, in order, with their log-probabilities.
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        assert_eq!(t.logprob.top.len(), 5);
        for (&(id, lp), &want_id) in t.logprob.top.iter().zip(&order) {
            assert_eq!(id as usize, want_id, "position {}", t.position);
            assert!(((lp - row[want_id]) as f64).abs() < tol(&model));
        }
    }
    // Text in, pieces out: the pieces add up to the decoded ids.
    let text = reference["prompts"][0]["prompt"].as_str().unwrap();
    let s = score(&model, Prompt::Text(text.into()), &ScoreOptions::default()).unwrap();
    assert_eq!(s.ids, prompt);
    assert_eq!(s.pieces.unwrap().concat(), model.decode(&prompt).unwrap());
}

#[test]
fn sliding_windows_equal_hf_perplexity_guide() {
    let model = load("tiny-gpt2");
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("sliding/reference.json")).unwrap()).unwrap();
    let text = std::fs::read_to_string(fixture("sliding/text.txt")).unwrap();
    let input_ids = ids(&reference["input_ids"]);
    assert!(input_ids.len() > 4 * 128, "the text is several contexts long");
    assert_eq!(model.tokenize(&text).unwrap(), input_ids);
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.iter().any(|c| c["stride"] == c["max_length"]) && cases.iter().any(|c| c["stride"].as_u64() < c["max_length"].as_u64()));
    for c in cases {
        let (max_length, stride) = (c["max_length"].as_u64().unwrap() as usize, c["stride"].as_u64().unwrap() as usize);
        let opts = ScoreOptions { max_length: Some(max_length), stride: Some(stride), ..Default::default() };
        let s = score(&model, Prompt::Text(text.clone()), &opts).unwrap();
        let nll = c["nll"].as_f64().unwrap();
        assert!(((s.nll - nll) / nll).abs() < 1e-4, "max_length {max_length} stride {stride}: nll {} vs HF {nll}", s.nll);
        assert_eq!(s.windows as u64, c["windows"].as_u64().unwrap());
        let positions: Vec<usize> = s.tokens.iter().map(|t| t.position).collect();
        let want: Vec<usize> = c["positions"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(positions, want, "max_length {max_length} stride {stride}: scored positions");
        for (t, lp) in s.tokens.iter().zip(c["logprobs"].as_array().unwrap()) {
            let lp = lp.as_f64().unwrap();
            assert!((t.logprob.logprob as f64 - lp).abs() < tol(&model), "position {}: {} vs {lp}", t.position, t.logprob.logprob);
        }
        assert!(s.timings.forward_tokens >= input_ids.len());
    }
}

/// Texts scored together, and with generations in the same steps, get their solo results; on
/// the CPU in f32 bit for bit.
#[test]
fn batched_scores_equal_solo_ones() {
    let model = load("tiny-gpt2");
    let text = std::fs::read_to_string(fixture("sliding/text.txt")).unwrap();
    let all = model.tokenize(&text).unwrap();
    let texts: Vec<Vec<u32>> = vec![all[..40].to_vec(), all[100..400].to_vec(), all[7..9].to_vec(), all.clone()];
    let opts = ScoreOptions { max_length: Some(96), stride: Some(40), logprobs: 2, ..Default::default() };
    // A small step budget and chunk, so windows are read in several chunks beside the generation
    // (chunk offsets are part of a text's numbers: the solo runs use the same chunk).
    let engine = EngineOptions { max_sequences: 8, max_step_tokens: 64, prefill_chunk: 24 };
    let solo: Vec<Score> = texts
        .iter()
        .map(|t| model.score_batch(vec![Prompt::Ids(t.clone())], &opts, Some(engine.clone()), &AtomicBool::new(false)).unwrap().pop().unwrap().unwrap())
        .collect();
    let gen_opts = GenerateOptions { sampling: SamplingParams { temperature: 0.9, top_k: 20, seed: Some(5), ..Default::default() }, ..greedy(30, true) };
    let gen_solo = run(&model, &all[50..60], &gen_opts);
    let scores: Vec<RefCell<Option<kvgpt::Result<Score>>>> = texts.iter().map(|_| RefCell::new(None)).collect();
    let generation = RefCell::new(None);
    let progress = RefCell::new(Vec::new());
    let stats = {
        let mut scheduler = Scheduler::new(&model, engine).unwrap();
        scheduler.submit(Request::Generate(GenerateRequest {
            prompt: Prompt::Ids(all[50..60].to_vec()),
            options: gen_opts.clone(),
            abort: Abort::Shared(Default::default()),
            on_token: None,
            on_done: Box::new(|r| *generation.borrow_mut() = Some(r)),
        }));
        for (i, (t, slot)) in texts.iter().zip(&scores).enumerate() {
            let progress = &progress;
            scheduler.submit(Request::Score(ScoreRequest {
                text: Prompt::Ids(t.clone()),
                options: opts.clone(),
                abort: Abort::Shared(Default::default()),
                on_progress: Some(Box::new(move |done, total| progress.borrow_mut().push((i, done, total)))),
                on_done: Box::new(move |r| *slot.borrow_mut() = Some(r)),
            }));
        }
        scheduler.run_to_completion();
        scheduler.stats()
    };
    assert!(stats.max_batch >= 3, "the texts shared steps: {stats:?}");
    let g = generation.into_inner().unwrap().unwrap();
    assert_eq!(g.tokens, gen_solo.tokens);
    for (i, (slot, want)) in scores.into_iter().zip(&solo).enumerate() {
        let got = slot.into_inner().unwrap().unwrap();
        assert_eq!(got.tokens.len(), want.tokens.len());
        if model.gpt2().device().is_cpu() {
            assert_eq!(got.tokens, want.tokens, "text {i}: batched log-probabilities equal solo ones bit for bit");
            assert_eq!(got.nll, want.nll);
        } else {
            assert!((got.nll - want.nll).abs() < 1e-3);
        }
    }
    // Progress: rising to the total for each text.
    let progress = progress.into_inner();
    for (i, t) in texts.iter().enumerate() {
        let mine: Vec<(usize, usize)> = progress.iter().filter(|p| p.0 == i).map(|p| (p.1, p.2)).collect();
        assert!(mine.windows(2).all(|w| w[0].0 < w[1].0), "text {i}: {mine:?}");
        assert_eq!(*mine.last().unwrap(), (t.len() - 1, t.len() - 1), "text {i}");
    }
}

/// A generation's logprobs are the model's, before sampling's processing: the same numbers as
/// scoring the prompt and the generated tokens.
#[test]
fn generation_logprobs_equal_the_scored_sequence() {
    let model = load("tiny-gpt2");
    let reference = reference_json("tiny-gpt2");
    let prompt = ids(&reference["prompts"][1]["input_ids"]);
    let opts = GenerateOptions {
        sampling: SamplingParams { temperature: 1.7, top_k: 30, top_p: 0.9, repetition_penalty: 1.3, seed: Some(11) },
        logprobs: Some(3),
        ..greedy(25, true)
    };
    let mut streamed = Vec::new();
    let g = model.generate(&prompt, &opts, &AtomicBool::new(false), &mut |e| streamed.push(e.logprob.cloned().unwrap())).unwrap();
    let lps = g.logprobs.clone().unwrap();
    assert_eq!(lps, streamed);
    assert_eq!(lps.len(), g.tokens.len());
    let seq = [prompt.clone(), g.tokens.clone()].concat();
    let s = score(&model, Prompt::Ids(seq), &ScoreOptions { logprobs: 3, ..Default::default() }).unwrap();
    for (j, lp) in lps.iter().enumerate() {
        let t = &s.tokens[prompt.len() - 1 + j];
        assert_eq!(lp.id, g.tokens[j]);
        assert!(((lp.logprob - t.logprob.logprob) as f64).abs() < tol(&model), "token {j}: {} vs {}", lp.logprob, t.logprob.logprob);
        assert_eq!(lp.top.iter().map(|x| x.0).collect::<Vec<_>>(), t.logprob.top.iter().map(|x| x.0).collect::<Vec<_>>());
    }
    // Greedy: the token is the first alternative, and its log-probability HF's step-0 one.
    let g = run(&model, &prompt, &GenerateOptions { logprobs: Some(1), ..greedy(3, true) });
    let lps = g.logprobs.unwrap();
    assert!(lps.iter().zip(&g.tokens).all(|(lp, &t)| lp.top[0].0 == t && lp.top[0].1 == lp.logprob));
    let step0 = candle_nn::ops::log_softmax(&reference_logits("tiny-gpt2")["prompt1.step0.logits"], D::Minus1).unwrap();
    let want = step0.to_vec1::<f32>().unwrap()[g.tokens[0] as usize];
    assert!(((lps[0].logprob - want) as f64).abs() < tol(&model));
    // Without the option nothing is computed.
    assert!(run(&model, &prompt, &greedy(3, true)).logprobs.is_none());
}

#[test]
fn bad_input_is_a_typed_error() {
    let model = load("tiny-gpt2");
    let d = ScoreOptions::default();
    let code = |r: kvgpt::Result<Score>| r.unwrap_err().code();
    let e = score(&model, Prompt::Text(String::new()), &d).unwrap_err();
    assert_eq!(e.code(), "KVGPT_INVALID_INPUT");
    assert!(e.to_string().contains("nothing to score"), "{e}");
    assert_eq!(code(score(&model, Prompt::Ids(vec![5]), &d)), "KVGPT_INVALID_INPUT");
    // With the BOS first, one token is something to score.
    let s = score(&model, Prompt::Ids(vec![5]), &ScoreOptions { add_bos: true, ..d.clone() }).unwrap();
    assert_eq!((s.ids.clone(), s.tokens.len()), (vec![50256, 5], 1));
    assert_eq!(code(score(&model, Prompt::Ids(vec![5, 60000]), &d)), "KVGPT_INVALID_INPUT");
    for o in [
        ScoreOptions { stride: Some(0), ..d.clone() },
        ScoreOptions { max_length: Some(64), stride: Some(65), ..d.clone() },
        ScoreOptions { max_length: Some(129), ..d.clone() },
        ScoreOptions { logprobs: 21, ..d.clone() },
    ] {
        assert_eq!(code(score(&model, Prompt::Ids(vec![1, 2, 3]), &o)), "KVGPT_OPTION_RANGE", "{o:?}");
    }
    let e = model.generate(&[1, 2], &GenerateOptions { logprobs: Some(21), ..greedy(2, true) }, &AtomicBool::new(false), &mut |_| {}).unwrap_err();
    assert_eq!(e.code(), "KVGPT_OPTION_RANGE");
    // An aborted scoring rejects; nothing partial comes back.
    let e = model.score(Prompt::Ids(vec![1, 2, 3]), &d, &AtomicBool::new(true)).unwrap_err();
    assert_eq!(e.code(), "KVGPT_ABORTED");
    // Bad input fails its text alone.
    let out = model.score_batch(vec![Prompt::Ids(vec![1, 2, 3]), Prompt::Ids(vec![]), Prompt::Ids(vec![4, 5])], &d, None, &AtomicBool::new(false)).unwrap();
    assert!(out[0].is_ok() && out[2].is_ok());
    assert_eq!(out[1].as_ref().unwrap_err().code(), "KVGPT_INVALID_INPUT");
}
