//! The Session API: feeding step by step through a preallocated cache equals generation,
//! truncation rewinds exactly, and overfilling is an error that leaves the session usable.

mod common;
use common::*;
use kvgpt::engine::sampling::argmax;
use kvgpt::Session;

fn next(session: &mut Session, model: &kvgpt::Model, ids: &[u32]) -> u32 {
    let logits = session.feed(model.gpt2(), ids).unwrap();
    argmax(&logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap())
}

#[test]
fn feeding_greedy_ids_reproduces_the_reference() {
    let model = load("tiny-gpt2");
    let reference = reference_json("tiny-gpt2");
    let p = &reference["prompts"][1];
    let (prompt, expected) = (ids(&p["input_ids"]), ids(&p["greedy_new_ids"]));
    for use_cache in [true, false] {
        let mut s = Session::new(model.gpt2(), prompt.len() + expected.len(), use_cache).unwrap();
        let mut got = vec![next(&mut s, &model, &prompt)];
        while got.len() < expected.len() {
            let last = *got.last().unwrap();
            got.push(next(&mut s, &model, &[last]));
        }
        assert_eq!(got, expected, "use_cache={use_cache}");
        assert_eq!(s.tokens().len(), prompt.len() + expected.len() - 1);
        assert_eq!(s.cache().is_some(), use_cache);
    }
}

#[test]
fn truncate_rewinds_to_the_same_logits() {
    let model = load("tiny-gpt2");
    let mut s = Session::new(model.gpt2(), 32, true).unwrap();
    let prompt = [464, 509, 53, 12940, 7000];
    s.feed(model.gpt2(), &prompt).unwrap();
    let a = s.feed(model.gpt2(), &[8251]).unwrap();
    s.feed(model.gpt2(), &[290, 3815]).unwrap();
    s.truncate(prompt.len());
    assert_eq!(s.tokens(), &prompt);
    assert_eq!(s.cache().unwrap().len(), prompt.len());
    let b = s.feed(model.gpt2(), &[8251]).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
fn overfilling_is_an_error_and_the_session_stays_usable() {
    let model = load("tiny-gpt2");
    let mut s = Session::new(model.gpt2(), 4, true).unwrap();
    s.feed(model.gpt2(), &[1, 2, 3]).unwrap();
    let err = s.feed(model.gpt2(), &[4, 5]).unwrap_err();
    assert_eq!(err.code(), "KVGPT_INVALID_INPUT");
    assert!(err.to_string().contains("room for 1 more, 2 given"), "{err}");
    assert_eq!(s.tokens(), &[1, 2, 3]);
    s.feed(model.gpt2(), &[4]).unwrap();
    assert_eq!(s.feed(model.gpt2(), &[]).unwrap_err().code(), "KVGPT_INVALID_INPUT");
    // The capacity never exceeds the model's context, whatever is asked.
    let big = Session::new(model.gpt2(), 10_000, true).unwrap();
    assert_eq!(big.cache().unwrap().capacity(), model.config().n_positions);
}
