//! The engine: sequences batched into one forward pass get exactly the tokens they get alone
//! (greedy and seeded sampling, cache on and off, mixed prompt lengths, prompts read in chunks,
//! sequences joining mid-flight and leaving early by max tokens, EOS, stop strings and aborts), HF's
//! left-padded batch is reproduced, one request's bad input fails it alone, and the engine
//! thread batches concurrent callers. On the CPU in f32 a row's numbers do not depend on the
//! rest of the step, so batched logits equal solo ones bit for bit.

mod common;
use common::*;
use kvgpt::engine::scheduler::{Abort, FeedRequest, GenerateRequest, Request};
use kvgpt::{EngineOptions, EngineStats, GenerateOptions, Generation, Job, KvCache, Logits, Model, Prompt, SamplingParams, Scheduler, Segment, Session, StopReason, WeightDType};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const N_POSITIONS: usize = 128;

fn on_cpu(model: &Model) -> bool {
    model.gpt2().device().is_cpu()
}

/// `n` valid ids of a varied pattern, different per `salt`.
fn prompt_of(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7919 + salt * 104_729 + 11) % 50_000).collect()
}

fn sampled(seed: u64, max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        sampling: SamplingParams { temperature: 0.8, top_k: 40, top_p: 0.9, repetition_penalty: 1.0, seed: Some(seed) },
        ..greedy(max_new_tokens, true)
    }
}

/// One request of a scripted run: it arrives before step `arrival`, and aborts itself from its
/// token callback once it has `abort_after` tokens.
#[derive(Clone, Debug)]
struct Spec {
    prompt: Vec<u32>,
    opts: GenerateOptions,
    arrival: usize,
    abort_after: Option<usize>,
}

/// Runs `specs` through one scheduler with `engine`'s limits; results in spec order.
fn run_scripted(model: &Model, engine: &EngineOptions, specs: &[Spec]) -> (Vec<kvgpt::Result<Generation>>, EngineStats) {
    let out: Vec<RefCell<Option<kvgpt::Result<Generation>>>> = specs.iter().map(|_| RefCell::new(None)).collect();
    let flags: Vec<AtomicBool> = specs.iter().map(|_| AtomicBool::new(false)).collect();
    let stats;
    {
        let mut scheduler = Scheduler::new(model, engine.clone()).unwrap();
        let mut step = 0;
        let mut submitted = 0;
        let mut order: Vec<usize> = (0..specs.len()).collect();
        order.sort_by_key(|&i| specs[i].arrival);
        loop {
            while submitted < order.len() && specs[order[submitted]].arrival <= step {
                let i = order[submitted];
                let (spec, flag, slot) = (&specs[i], &flags[i], &out[i]);
                let mut seen = 0;
                scheduler.submit(Request::Generate(GenerateRequest {
                    prompt: Prompt::Ids(spec.prompt.clone()),
                    options: spec.opts.clone(),
                    abort: Abort::Borrowed(flag),
                    on_token: Some(Box::new(move |_| {
                        seen += 1;
                        if Some(seen) == spec.abort_after {
                            flag.store(true, Ordering::Relaxed);
                        }
                    })),
                    on_done: Box::new(move |r| *slot.borrow_mut() = Some(r)),
                }));
                submitted += 1;
            }
            if submitted == order.len() && scheduler.is_idle() {
                break;
            }
            scheduler.step();
            step += 1;
        }
        stats = scheduler.stats().clone();
    }
    (out.into_iter().map(|r| r.into_inner().expect("every request ends")).collect(), stats)
}

/// A spec run alone, under the same limits (so its prompt is chunked the same way).
fn solo(model: &Model, engine: &EngineOptions, spec: &Spec) -> kvgpt::Result<Generation> {
    let alone = Spec { arrival: 0, ..spec.clone() };
    run_scripted(model, engine, &[alone]).0.pop().unwrap()
}

fn same_result(a: &kvgpt::Result<Generation>, b: &kvgpt::Result<Generation>, what: &str) {
    match (a, b) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.tokens, b.tokens, "{what}: tokens");
            assert_eq!(a.text, b.text, "{what}: text");
            assert_eq!(a.stop_reason, b.stop_reason, "{what}: stop reason");
            assert_eq!(a.prompt, b.prompt, "{what}: prompt");
        }
        (Err(a), Err(b)) => assert_eq!((a.code(), a.to_string()), (b.code(), b.to_string()), "{what}: error"),
        (a, b) => panic!("{what}: batched {:?} but alone {:?}", a.as_ref().map(|g| &g.tokens), b.as_ref().map(|g| &g.tokens)),
    }
}

#[test]
fn batched_greedy_equals_the_reference_and_hf_left_padded_batch() {
    let model = load("tiny-gpt2");
    let reference = reference_json("tiny-gpt2");
    let prompts: Vec<Vec<u32>> = (0..5).map(|i| reference_prompt("tiny-gpt2", i).0).collect();
    let hf_batch = reference["batch_left_padded_greedy_new_ids"].as_array().unwrap();
    for use_cache in [true, false] {
        let results = model.generate_batch(&prompts, &greedy(40, use_cache), None, &AtomicBool::new(false)).unwrap();
        for (i, r) in results.iter().enumerate() {
            let g = r.as_ref().unwrap();
            assert_eq!(g.tokens, reference_prompt("tiny-gpt2", i).1, "prompt {i} use_cache={use_cache}");
            assert_eq!(g.tokens, ids(&hf_batch[i]), "prompt {i}: HF's left-padded batch");
            assert!(g.timings.mean_batch_size > 1.0, "prompt {i} rode alone: {}", g.timings.mean_batch_size);
        }
    }
}

/// Logits of sequences run together equal those run alone: bit for bit on the CPU (short
/// segments in the shared matvec group, a 60-token one in a gemm of its own), within a few of
/// the dtype's roundings elsewhere.
/// Solo and batched, bit for bit on the CPU, in every dtype: one-row steps, short and long
/// chunks together (packed weights' few-row kernels, q8_0's integer products for chunks).
#[test]
fn batched_logits_equal_solo_logits() {
    for dtype in [WeightDType::F32, WeightDType::F16, WeightDType::Bf16, WeightDType::Q8_0] {
        batched_logits_equal_solo_logits_in(dtype);
    }
}

fn batched_logits_equal_solo_logits_in(dtype: WeightDType) {
    let model = load_as("tiny-gpt2", dtype);
    let gpt2 = model.gpt2();
    let prompts = [prompt_of(6, 1), prompt_of(1, 2), prompt_of(60, 3), prompt_of(17, 4), prompt_of(33, 5)];
    let alone: Vec<Vec<f32>> = prompts
        .iter()
        .map(|p| {
            let mut s = Session::new(gpt2, 64, true).unwrap();
            let mut rows = s.feed(gpt2, p).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            rows.extend(s.feed(gpt2, &[464]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
            rows
        })
        .collect();
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new(model.config(), 64, gpt2.cache_dtype(), gpt2.device()).unwrap()).collect();
    let mut together = vec![Vec::new(); prompts.len()];
    for round in 0..2 {
        let step = {
            let segs: Vec<Segment> = caches
                .iter()
                .zip(&prompts)
                .map(|(c, p)| Segment { ids: if round == 0 { p } else { &[464] }, cache: c, logits: Logits::Last })
                .collect();
            gpt2.forward_batch(&segs).unwrap()
        };
        let logits = step.logits.unwrap().to_device(&candle_core::Device::Cpu).unwrap();
        for (i, rows) in step.rows.iter().enumerate() {
            together[i].extend(logits.narrow(0, rows.start, rows.len()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        for (c, p) in caches.iter_mut().zip(&prompts) {
            c.advance(if round == 0 { p.len() } else { 1 });
        }
    }
    // On CUDA a product's kernel depends on its row count (cuBLAS picks by shape; kvgpt's decode
    // step has one per bucket of 1, 2, 4, 8 rows, the same sums in the same order, but candle's
    // prompt rows are cuBLAS's), so rows agree to within a few roundings of the dtype: bounds
    // relative to the largest logit (the H200 gave f16 2^-9 at logits near 2).
    let bound = match dtype {
        WeightDType::F32 => 1e-3,
        WeightDType::F16 => 4e-3,
        WeightDType::Bf16 | WeightDType::Q8_0 => 3e-2,
    };
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        if on_cpu(&model) {
            assert_eq!(diff, 0.0, "{dtype:?} prompt {i}: batched logits differ from solo ones");
        } else {
            let big = a.iter().fold(1f32, |m, x| m.max(x.abs()));
            println!("{dtype:?} prompt {i}: batched logits within {diff:.2e} of solo ones (largest {big:.2})");
            assert!(diff <= bound * big, "{dtype:?} prompt {i}: batched logits {diff} off solo ones (largest {big})");
        }
    }
}

#[test]
fn a_pass_refuses_one_cache_twice_and_an_empty_step() {
    let model = load("tiny-gpt2");
    let gpt2 = model.gpt2();
    let cache = KvCache::new(model.config(), 8, gpt2.cache_dtype(), gpt2.device()).unwrap();
    let seg = || Segment { ids: &[1, 2], cache: &cache, logits: Logits::Last };
    let e = gpt2.forward_batch(&[seg(), seg()]).err().unwrap();
    assert_eq!(e.code(), "KVGPT_INVALID_INPUT");
    assert!(e.to_string().contains("share a KV cache"), "{e}");
    assert_eq!(gpt2.forward_batch(&[]).err().unwrap().code(), "KVGPT_INVALID_INPUT");
    assert!(cache.is_empty(), "nothing was committed");
}

#[test]
fn mixed_lengths_chunked_prompts_joins_and_early_leavers_equal_solo() {
    let model = load("tiny-gpt2");
    let engine = EngineOptions { max_sequences: 3, max_step_tokens: 24, prefill_chunk: 8 };
    for use_cache in [true, false] {
        let lengths = [1, 5, 17, 33, 60, N_POSITIONS - 40];
        let news = [40, 3, 20, 7, 40, 40];
        let mut specs: Vec<Spec> = lengths
            .iter()
            .zip(news)
            .enumerate()
            .map(|(i, (&n, max_new))| Spec { prompt: prompt_of(n, i as u32), opts: greedy(max_new, use_cache), arrival: 2 * i, abort_after: None })
            .collect();
        // One leaves by a stop string: the text of its 4th to 6th token, alone.
        let alone = solo(&model, &engine, &specs[0]).unwrap();
        let stop = model.decode(&alone.tokens[3..6]).unwrap();
        specs[0].opts.stop = vec![stop];
        // One aborts after 4 tokens.
        specs[2].abort_after = Some(4);
        let (batched, stats) = run_scripted(&model, &engine, &specs);
        for (i, (b, spec)) in batched.iter().zip(&specs).enumerate() {
            same_result(b, &solo(&model, &engine, spec), &format!("request {i} use_cache={use_cache}"));
        }
        assert_eq!(batched[0].as_ref().unwrap().stop_reason, StopReason::StopString);
        assert_eq!(batched[2].as_ref().unwrap().stop_reason, StopReason::Aborted);
        assert_eq!(batched[2].as_ref().unwrap().tokens.len(), 4);
        assert_eq!(batched[5].as_ref().unwrap().stop_reason, StopReason::MaxNewTokens);
        // With the cache, three sequences (a token or a chunk of 8 each) fit in a 24-token step;
        // without it each pass is a whole sequence, and only the oldest is sure to go.
        let want = if use_cache { 3 } else { 2 };
        assert_eq!(stats.max_batch, want, "use_cache={use_cache}: at most maxSequences ride together");
        assert!(stats.max_queue_ms > 0.0, "some waited for a place");
        assert_eq!(stats.completed, specs.len() as u64);
    }
}

/// Leaving by EOS: a copy of tiny-gpt2 whose config names as EOS a token that prompt 0's greedy
/// run produces at step 4 (the random weights never produce 50256), run beside sequences that
/// go on; with `ignore_eos` it goes on too.
#[test]
fn a_sequence_that_meets_eos_leaves_early_and_the_others_go_on() {
    let (prompt0, greedy0) = reference_prompt("tiny-gpt2", 0);
    let eos = greedy0[4];
    let first = greedy0.iter().position(|&t| t == eos).unwrap();
    let dir = TempDir::new("eos");
    copy_fixture_files("tiny-gpt2", &["model.safetensors", "tokenizer.json", "generation_config.json"], dir.path());
    let config = std::fs::read_to_string(fixture("tiny-gpt2").join("config.json")).unwrap();
    std::fs::write(dir.path().join("config.json"), config.replace("\"eos_token_id\": 50256", &format!("\"eos_token_id\": {eos}"))).unwrap();
    let model = Model::load(dir.path().to_str().unwrap(), &kvgpt::LoadOptions { device: test_device(), ..Default::default() }).unwrap();
    let engine = EngineOptions { max_sequences: 4, max_step_tokens: 32, prefill_chunk: 8 };
    let mut stops = greedy(40, true);
    stops.ignore_eos = false;
    let specs: Vec<Spec> = [(prompt0.clone(), stops.clone()), (prompt0.clone(), greedy(40, true))]
        .into_iter()
        .chain((1..4).map(|i| (reference_prompt("tiny-gpt2", i).0, stops.clone())))
        .enumerate()
        .map(|(i, (prompt, opts))| Spec { prompt, opts, arrival: i, abort_after: None })
        .collect();
    let (batched, _) = run_scripted(&model, &engine, &specs);
    let g0 = batched[0].as_ref().unwrap();
    assert_eq!(g0.stop_reason, StopReason::Eos);
    assert_eq!(g0.tokens, greedy0[..=first], "the EOS id is the last token");
    assert_eq!(batched[1].as_ref().unwrap().tokens, greedy0, "ignoreEos goes on through the same token");
    for (i, (b, spec)) in batched.iter().zip(&specs).enumerate() {
        same_result(b, &solo(&model, &engine, spec), &format!("request {i}"));
    }
}

#[test]
fn seeded_sampling_batched_equals_solo() {
    let model = load("tiny-gpt2");
    let engine = EngineOptions::defaults_for(model.gpt2().device());
    let mut specs: Vec<Spec> = (0..5)
        .map(|i| Spec { prompt: reference_prompt("tiny-gpt2", i).0, opts: sampled(100 + i as u64, 30), arrival: i, abort_after: None })
        .collect();
    specs[3].opts.sampling.repetition_penalty = 1.3;
    specs[4].opts.sampling.top_k = 0;
    let (batched, _) = run_scripted(&model, &engine, &specs);
    for (i, (b, spec)) in batched.iter().zip(&specs).enumerate() {
        same_result(b, &solo(&model, &engine, spec), &format!("request {i}"));
    }
    let greedy_ids = reference_prompt("tiny-gpt2", 0).1;
    assert_ne!(batched[0].as_ref().unwrap().tokens, greedy_ids[..30], "temperature 0.8 is not greedy");
}

#[test]
fn bad_input_fails_that_request_alone() {
    let model = load("tiny-gpt2");
    let engine = EngineOptions::defaults_for(model.gpt2().device());
    let mut out_of_vocab = prompt_of(5, 9);
    out_of_vocab[2] = 50_257;
    let mut bad_options = greedy(10, true);
    bad_options.sampling.temperature = -1.0;
    let specs: Vec<Spec> = [
        (prompt_of(7, 1), greedy(10, true)),
        (prompt_of(N_POSITIONS + 1, 2), greedy(10, true)),
        (out_of_vocab, greedy(10, true)),
        (vec![], greedy(10, true)),
        (prompt_of(9, 3), bad_options),
        (prompt_of(12, 4), greedy(10, true)),
    ]
    .into_iter()
    .map(|(prompt, opts)| Spec { prompt, opts, arrival: 0, abort_after: None })
    .collect();
    let (batched, _) = run_scripted(&model, &engine, &specs);
    let codes: Vec<&str> = batched.iter().map(|r| r.as_ref().map_or_else(|e| e.code(), |_| "ok")).collect();
    assert_eq!(codes, ["ok", "KVGPT_INVALID_INPUT", "KVGPT_INVALID_INPUT", "ok", "KVGPT_OPTION_RANGE", "ok"]);
    assert!(batched[1].as_ref().unwrap_err().to_string().contains("prompt is 129 tokens but the model's context is 128"));
    assert_eq!(batched[3].as_ref().unwrap().prompt, [50256], "an empty prompt starts from BOS");
    for i in [0, 3, 5] {
        same_result(&batched[i], &solo(&model, &engine, &specs[i]), &format!("request {i}"));
    }
}

/// Random arrivals, lengths, options, engine limits and aborts: every result equals its solo
/// run. 40 cases from a fixed seed; a failure names the case.
#[test]
fn random_schedules_equal_solo_runs() {
    let model = load("tiny-gpt2");
    let mut rng = ChaCha8Rng::seed_from_u64(20261202);
    for case in 0..40 {
        let max_sequences = rng.random_range(1..=4);
        let prefill_chunk = rng.random_range(1..=40);
        let engine = EngineOptions { max_sequences, prefill_chunk, max_step_tokens: rng.random_range(prefill_chunk.max(max_sequences)..=64) };
        let n = rng.random_range(1..=6);
        let specs: Vec<Spec> = (0..n)
            .map(|i| {
                let max_new = rng.random_range(0..=24);
                let len = rng.random_range(0..=N_POSITIONS - max_new);
                let mut opts = if rng.random_bool(0.5) { greedy(max_new, true) } else { sampled(rng.random(), max_new) };
                opts.use_cache = rng.random_bool(0.8);
                if rng.random_bool(0.2) {
                    opts.stop = vec![" ".into()];
                }
                Spec {
                    prompt: prompt_of(len, case * 10 + i),
                    opts,
                    arrival: rng.random_range(0..12),
                    abort_after: if rng.random_bool(0.2) { Some(rng.random_range(1..=8)) } else { None },
                }
            })
            .collect();
        let (batched, _) = run_scripted(&model, &engine, &specs);
        for (i, (b, spec)) in batched.iter().zip(&specs).enumerate() {
            same_result(b, &solo(&model, &engine, spec), &format!("case {case} request {i} {engine:?} {spec:?}"));
        }
    }
}

#[test]
fn the_engine_thread_batches_concurrent_callers_and_sessions() {
    let model = Arc::new(load("tiny-gpt2"));
    let engine = kvgpt::Engine::start(model.clone(), EngineOptions::defaults_for(model.gpt2().device())).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..5 {
        let tx = tx.clone();
        engine
            .submit(Job::Generate {
                prompt: Prompt::Ids(reference_prompt("tiny-gpt2", i).0),
                options: greedy(40, true),
                abort: Arc::new(AtomicBool::new(false)),
                on_token: None,
                on_done: Box::new(move |r| tx.send((i, r.map(|g| g.tokens))).unwrap()),
            })
            .unwrap();
    }
    // A session fed through the engine alongside: its greedy next id equals the reference's.
    let (prompt, expected) = reference_prompt("tiny-gpt2", 1);
    let session = Arc::new(Mutex::new(Session::new(model.gpt2(), 64, true).unwrap()));
    let (ftx, frx) = std::sync::mpsc::channel();
    engine.submit(Job::Feed { session: session.clone(), ids: prompt, on_done: Box::new(move |r| ftx.send(r).unwrap()) }).unwrap();
    // Dropping the engine refuses new jobs but finishes those in flight.
    let stats_before_drop = engine.stats();
    drop(engine);
    drop(tx);
    let mut got: Vec<_> = rx.iter().collect();
    got.sort_by_key(|(i, _)| *i);
    assert_eq!(got.len(), 5);
    for (i, tokens) in got {
        assert_eq!(tokens.unwrap(), reference_prompt("tiny-gpt2", i).1, "prompt {i}");
    }
    assert_eq!(frx.recv().unwrap().unwrap(), expected[0]);
    assert!(stats_before_drop.waiting + stats_before_drop.active <= 6);
}

#[test]
fn a_second_feed_on_a_busy_session_is_refused_and_a_full_one_fails_alone() {
    let model = load("tiny-gpt2");
    let a = Arc::new(Mutex::new(Session::new(model.gpt2(), 8, true).unwrap()));
    let b = Arc::new(Mutex::new(Session::new(model.gpt2(), 8, true).unwrap()));
    let results: Vec<RefCell<Option<Result<u32, String>>>> = (0..3).map(|_| RefCell::new(None)).collect();
    {
        let mut scheduler = Scheduler::new(&model, EngineOptions::defaults_for(model.gpt2().device())).unwrap();
        for (slot, (session, ids)) in results.iter().zip([(&a, vec![1u32, 2, 3]), (&a, vec![4]), (&b, prompt_of(20, 1))]) {
            let session = session.clone();
            scheduler.submit(Request::Feed(FeedRequest { session, ids, on_done: Box::new(move |x| *slot.borrow_mut() = Some(x.map_err(|e| e.to_string()))) }));
        }
        scheduler.run_to_completion();
    }
    let r: Vec<Result<u32, String>> = results.into_iter().map(|r| r.into_inner().unwrap()).collect();
    let mut alone = Session::new(model.gpt2(), 8, true).unwrap();
    let want = kvgpt::engine::sampling::argmax(&alone.feed(model.gpt2(), &[1, 2, 3]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
    assert_eq!(r[0], Ok(want));
    assert!(matches!(&r[1], Err(e) if e.contains("already running")), "{:?}", r[1]);
    assert!(matches!(&r[2], Err(e) if e.contains("room for 8 more, 20 given")), "{:?}", r[2]);
    assert_eq!(a.lock().unwrap().tokens(), [1, 2, 3]);
    assert!(b.lock().unwrap().tokens().is_empty(), "a refused feed leaves its session as it was");
}

#[test]
fn engine_limits_are_checked_and_defaults_bend_to_given_ones() {
    let cpu = candle_core::Device::Cpu;
    let d = EngineOptions::defaults_for(&cpu);
    assert_eq!(EngineOptions::resolve(&cpu, None, None, None).unwrap(), d);
    let big = EngineOptions::resolve(&cpu, Some(600), None, None).unwrap();
    assert_eq!((big.max_sequences, big.max_step_tokens), (600, 600), "the step budget rises to fit");
    let small = EngineOptions::resolve(&cpu, None, Some(16), None).unwrap();
    assert_eq!((small.max_sequences, small.prefill_chunk), (16, 16), "sequences and chunk fall to fit");
    for (s, t, c, name) in [(Some(0), None, None, "maxSequences"), (None, Some(70_000), None, "maxStepTokens"), (Some(8), Some(4), None, "maxStepTokens"), (None, Some(8), Some(9), "prefillChunk")] {
        let e = EngineOptions::resolve(&cpu, s, t, c).unwrap_err();
        assert_eq!(e.code(), "KVGPT_OPTION_RANGE");
        assert!(e.to_string().starts_with(name), "{e}");
    }
}

/// On CUDA, kvgpt's own decode step (`cuda::step`) against candle's ops: replayed as a CUDA
/// graph and launched kernel by kernel, it gives candle's logits (f32 within 1e-4 of the step's
/// largest logit; f16 and bf16 within their rounding, which candle applies after every op and
/// kvgpt's fused kernels once a product), for steps of 1, 3 (a bucket of 4 with a spare row) and
/// 8 rows, at contexts below and above the split attention's threshold; the graph and the plain
/// launches agree bit for bit, with programmatic dependent launch (where the build has it) and
/// without, and the greedy ids the step takes on the device are its logits' argmax. Runs with
/// KVGPT_TEST_DEVICE=cuda on a build with `--features cuda`.
#[cfg(feature = "cuda")]
#[test]
fn cuda_decode_step_equals_candles_ops() {
    for (dtype, tol) in [(WeightDType::F32, 1e-4f32), (WeightDType::F16, 1e-2), (WeightDType::Bf16, 4e-2)] {
        let model = load_as("tiny-gpt2", dtype);
        for rows in [1usize, 3, 8] {
            compare_decode_paths(&model, &[1, 5, 58, 100, 3, 17, 60, 9][..rows], 12, tol, &format!("tiny-gpt2 {dtype:?}"));
        }
    }
}

/// The same on GPT-2 small's shapes (random weights, f16) at contexts 8, 600 and 1000 and 8 rows
/// of mixed contexts, with each path's step time printed. Per context, 189 of the step's kernels
/// run a step (63 each for the graph, the plain kernels and the graph without programmatic
/// dependent launch), 126 more in the first (each graph's eager run before its capture):
/// `bench/gpu/issue12.sh` profiles one step from that count.
#[cfg(feature = "cuda")]
#[test]
fn cuda_decode_step_gpt2_small() {
    let opts = kvgpt::LoadOptions { device: test_device(), dtype: WeightDType::F16, hub: None };
    let small = Model::random(kvgpt::Gpt2Config::gpt2_small(), 0, &opts).unwrap();
    for lengths in [&[8usize][..], &[600], &[1000], &[8, 600, 30, 200, 1, 64, 500, 12]] {
        compare_decode_paths(&small, lengths, 20, 1e-2, "GPT-2 small f16");
    }
}

/// Prefills one set of caches per decode path (candle's ops: a prompt is many rows), then runs
/// `steps` one-token steps of every prompt at once through candle's ops, the graph and the plain
/// kernels (with programmatic dependent launch where the build has it), and the graph without
/// it, feeding all four candle's greedy ids, and compares their logits and greedy ids.
#[cfg(feature = "cuda")]
fn compare_decode_paths(model: &Model, lengths: &[usize], steps: usize, tol: f32, what: &str) {
    use kvgpt::cuda::step::StepMode;
    let gpt2 = model.gpt2();
    assert!(gpt2.device().is_cuda(), "this test runs on CUDA: set KVGPT_TEST_DEVICE=cuda");
    assert!(gpt2.cuda_step_mode().is_some(), "{what}: the model has kvgpt's decode step");
    let rows = lengths.len();
    let cap = model.config().n_positions;
    let prompts: Vec<Vec<u32>> = lengths.iter().enumerate().map(|(i, &n)| prompt_of(n, i as u32)).collect();
    // (path, programmatic dependent launch)
    let modes = [(StepMode::Candle, true), (StepMode::Graph, true), (StepMode::Kernels, true), (StepMode::Graph, false)];
    let pdl = gpt2.set_cuda_pdl(true).unwrap();
    let mut caches: Vec<Vec<KvCache>> =
        modes.iter().map(|_| prompts.iter().map(|_| KvCache::new(model.config(), cap, gpt2.cache_dtype(), gpt2.device()).unwrap()).collect()).collect();
    let mut next: Vec<u32> = Vec::new();
    assert!(gpt2.set_cuda_step_mode(StepMode::Candle));
    for set in caches.iter_mut() {
        let segs: Vec<Segment> = set.iter().zip(&prompts).map(|(c, p)| Segment { ids: p, cache: c, logits: Logits::Last }).collect();
        next = gpt2.forward_batch(&segs).unwrap().logits.unwrap().argmax(1).unwrap().to_vec1::<u32>().unwrap();
        for (c, p) in set.iter_mut().zip(&prompts) {
            c.advance(p.len());
        }
    }
    let mut times = vec![Vec::new(); modes.len()];
    for step in 0..steps {
        let mut out: Vec<Vec<f32>> = Vec::new();
        for ((set, &(mode, on)), time) in caches.iter_mut().zip(&modes).zip(times.iter_mut()) {
            assert!(gpt2.set_cuda_step_mode(mode));
            gpt2.set_cuda_pdl(on);
            let ids: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            let segs: Vec<Segment> = set.iter().zip(&ids).map(|(c, id)| Segment { ids: id, cache: c, logits: Logits::Last }).collect();
            let t0 = std::time::Instant::now();
            let step_logits = gpt2.forward_batch(&segs).unwrap();
            let logits = step_logits.logits.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            time.push(t0.elapsed().as_secs_f64() * 1e3);
            assert_eq!(step_logits.rows, (0..rows).map(|i| i..i + 1).collect::<Vec<_>>());
            match (mode, step_logits.greedy) {
                (StepMode::Candle, greedy) => assert!(greedy.is_none(), "{what}: candle's path takes no greedy ids"),
                (_, greedy) => {
                    let greedy = greedy.expect("kvgpt's step takes the greedy ids").to_vec1::<u32>().unwrap();
                    let argmax: Vec<u32> = logits.chunks(logits.len() / rows).map(kvgpt::engine::sampling::argmax).collect();
                    assert_eq!(greedy, argmax, "{what}, {rows} rows, step {step}, {mode:?}: the device's greedy ids are not its logits' argmax");
                }
            }
            out.push(logits);
            for c in set.iter_mut() {
                c.advance(1);
            }
        }
        let big = out[0].iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let (graph, kernels) = (diff(&out[0], &out[1]), diff(&out[0], &out[2]));
        assert!(graph <= tol * big, "{what}, {rows} rows, step {step}: the graph's logits are {graph} off candle's (largest {big})");
        assert!(kernels <= tol * big, "{what}, {rows} rows, step {step}: the kernels' logits are {kernels} off candle's (largest {big})");
        assert_eq!(out[1], out[2], "{what}, {rows} rows, step {step}: the graph's logits differ from the same kernels launched one by one");
        assert_eq!(out[1], out[3], "{what}, {rows} rows, step {step}: the graph's logits differ with programmatic dependent launch ({pdl}) and without");
        let vocab = out[0].len() / rows;
        next = out[0].chunks(vocab).map(kvgpt::engine::sampling::argmax).collect();
    }
    assert!(gpt2.set_cuda_step_mode(StepMode::Graph));
    gpt2.set_cuda_pdl(true);
    let med = |t: &mut Vec<f64>| {
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    let ms: Vec<f64> = times.iter_mut().map(med).collect();
    println!(
        "{what}, {rows} rows at contexts {lengths:?}: a step (with the logits' copy to the host) candle {:.3} ms, graph {:.3}, kernels {:.3}, graph without programmatic dependent launch {:.3} (with it: {pdl})",
        ms[0], ms[1], ms[2], ms[3]
    );
}
