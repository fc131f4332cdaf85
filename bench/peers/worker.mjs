// One engine at one precision, in a process of its own (so its load time and peak RSS are its
// own): `node worker.mjs kvgpt|llama f32|f16|q8_0`. Prints one JSON line: loadMs, decode
// (context -> median ms a token over STEPS one-token steps, the prompt of `context` tokens read
// in one pass first), prefillMs (median time to the first token of a PREFILL-token prompt,
// over 3), peakRssMB. Timed as a Node user sees it: between tokens arriving in JS, for every
// engine. Greedy, 2 threads, the same weights (bench/peers/setup.sh) and the same token ids.
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const here = path.dirname(fileURLToPath(import.meta.url));
const work = process.env.KVGPT_PEERS_WORK ?? path.join(here, 'work');
const [engine, precision] = process.argv.slice(2);
const CONTEXTS = (process.env.KVGPT_BENCH_CONTEXTS ?? '16,256,512,1000').split(',').map(Number);
const STEPS = Number(process.env.KVGPT_PEERS_STEPS ?? 20);
const PREFILL = 512;
// bench/common.js's ids, written again: that module loads kvgpt, whose addon would count in
// node-llama-cpp's peak RSS.
const ids = (n) => Array.from({ length: n }, (_, i) => (i * 4099 + 13) % 50257);
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)];

/** Each engine as the same three calls: load, then `run(prompt, n)` -> arrival times of n tokens. */
const engines = {
  async kvgpt() {
    const { Gpt2 } = createRequire(import.meta.url)('../../dist');
    // The whole prompt in one forward pass, as the others read it.
    const model = await Gpt2.load(path.join(work, 'gpt2-small-random'), { dtype: precision, prefillChunk: 1024, maxStepTokens: 1024 });
    return async (prompt, n) => {
      const times = [];
      const t0 = performance.now();
      for await (const _ of model.stream(prompt, { maxNewTokens: n, temperature: 0, ignoreEos: true })) times.push(performance.now() - t0);
      return times;
    };
  },
  async llama() {
    const { getLlama, LlamaLogLevel } = await import(path.join(here, 'node_modules/node-llama-cpp/dist/index.js'));
    const llama = await getLlama({ gpu: false, build: 'never', maxThreads: 2, logLevel: LlamaLogLevel.error });
    const model = await llama.loadModel({ modelPath: path.join(work, `gpt2-small-random-${precision}.gguf`) });
    const context = await model.createContext({ contextSize: 1024, batchSize: 1024, threads: 2, sequences: 1 });
    const seq = context.getSequence();
    return async (prompt, n) => {
      await seq.clearHistory();
      const times = [];
      const t0 = performance.now();
      for await (const _ of seq.evaluate(prompt, { temperature: 0 })) {
        times.push(performance.now() - t0);
        if (times.length === n) break;
      }
      return times;
    };
  },
};

const t0 = performance.now();
const run = await engines[engine]();
const loadMs = performance.now() - t0;
await run(ids(8), 4); // warm-up
const decode = {};
for (const c of CONTEXTS) {
  const times = await run(ids(c), STEPS + 1);
  decode[c] = median(times.slice(1).map((t, i) => t - times[i]));
}
const prefills = [];
for (let r = 0; r < 3; r++) prefills.push((await run(ids(PREFILL), 1))[0]);
const peakRssMB = (process.resourceUsage().maxRSS * 1024) / 2 ** 20;
console.log(JSON.stringify({ engine, precision, loadMs, decode, prefillMs: median(prefills), peakRssMB }));
process.exit(0);
