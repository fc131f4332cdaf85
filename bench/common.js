// Shared by the benny suites: the model (GPT-2 small shapes, seeded random weights: timing does
// not depend on the weights), loaded once per process and outside every timed function, and
// benny's options and output (bench/results/, ignored by git).
const b = require('benny');
const { Gpt2 } = require('../dist');

const RESULTS = `${__dirname}/results`;
let model;

/**
 * GPT-2 small with random weights, or the model in KVGPT_BENCH_MODEL (a directory or hub id),
 * in KVGPT_BENCH_DTYPE (f32, f16, bf16, q8_0; default f32) on KVGPT_BENCH_DEVICE (default cpu).
 */
async function loadModel() {
  const load = { dtype: process.env.KVGPT_BENCH_DTYPE ?? 'f32', device: process.env.KVGPT_BENCH_DEVICE ?? 'cpu' };
  if (!model) model = process.env.KVGPT_BENCH_MODEL ? await Gpt2.load(process.env.KVGPT_BENCH_MODEL, load) : await Gpt2.random({}, { seed: 0, ...load });
  return model;
}

/** Deterministic prompt ids inside the vocabulary. */
function ids(n, vocab = 50257) {
  return Array.from({ length: n }, (_, i) => (i * 4099 + 13) % vocab);
}

/**
 * Wraps an async benchmark body so calls never overlap: benny calls it once to see that it
 * returns a promise and may start the timed calls before that one settles, which on a shared
 * session would interleave a truncate with another call's feed.
 */
function serial(body) {
  let last = Promise.resolve();
  return () => (last = last.then(body));
}

/**
 * Runs a benny suite of `cases` (from b.add) and saves JSON and chart HTML under bench/results,
 * named after the suite and, when it is not f32, the dtype (decode-step-q8_0.json);
 * `onComplete(summary)`, if given, runs once all cases are done.
 */
function suite(name, cases, onComplete) {
  const dtype = process.env.KVGPT_BENCH_DTYPE;
  if (dtype && dtype !== 'f32') name = `${name}-${dtype}`;
  return b.suite(
    name,
    ...cases,
    b.configure({ cases: { minSamples: 5, maxTime: 3 }, minDisplayPrecision: 3 }),
    b.cycle(),
    b.complete(),
    ...(onComplete ? [b.complete(onComplete)] : []),
    b.save({ file: name, folder: RESULTS, version: null, format: 'json', details: true }),
    b.save({ file: name, folder: RESULTS, version: null, format: 'chart.html' }),
  );
}

module.exports = { b, loadModel, ids, serial, suite, RESULTS };
