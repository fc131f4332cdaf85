// Shared by the benny suites: the model (GPT-2 small shapes, seeded random weights: timing does
// not depend on the weights), loaded once per process and outside every timed function, and
// benny's options and output (bench/results/, ignored by git).
const b = require('benny');
const { Gpt2 } = require('../dist');

const RESULTS = `${__dirname}/results`;
let model;

/** GPT-2 small with random weights, or the model in KVGPT_BENCH_MODEL (a directory or hub id). */
async function loadModel() {
  if (!model) model = process.env.KVGPT_BENCH_MODEL ? await Gpt2.load(process.env.KVGPT_BENCH_MODEL) : await Gpt2.random({}, { seed: 0 });
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

/** Runs a benny suite of `cases` (from b.add) and saves JSON and chart HTML under bench/results. */
function suite(name, cases) {
  return b.suite(
    name,
    ...cases,
    b.configure({ cases: { minSamples: 5, maxTime: 3 }, minDisplayPrecision: 3 }),
    b.cycle(),
    b.complete(),
    b.save({ file: name, folder: RESULTS, version: null, format: 'json', details: true }),
    b.save({ file: name, folder: RESULTS, version: null, format: 'chart.html' }),
  );
}

module.exports = { b, loadModel, ids, serial, suite };
