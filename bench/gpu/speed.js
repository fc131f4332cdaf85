// kvgpt on a GPU through the public API (dist/): argmax parity on the reference fixtures in each
// dtype, then per-token decode latency of GPT-2 small shapes (seeded random weights, batch 1,
// cache on) at contexts 16/256/512/1000 in f32/f16/bf16. Writes one JSON object to argv[2].
//
//   KVGPT_CUDA_BINARY=kvgpt.linux-x64-gnu.cuda.node node bench/gpu/speed.js out.json
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const { Gpt2 } = require(process.env.KVGPT_DIST ?? '../../dist');
const fixtures = process.env.KVGPT_FIXTURES ?? path.join(__dirname, '../../test/fixtures');

const out = process.argv[2] ?? 'kvgpt-gpu.json';
const device = process.env.KVGPT_BENCH_DEVICE ?? 'cuda';
const dtypes = (process.env.KVGPT_BENCH_DTYPES ?? 'f32,f16,bf16').split(',');
const contexts = [16, 256, 512, 1000];
const STEPS = 21; // new tokens per context: 20 decode steps (1000 + 21 fits in 1024 positions)
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)];
const ids = (n) => Array.from({ length: n }, (_, i) => (i * 4099 + 13) % 50257);

async function parity(result) {
  for (const name of ['tiny-gpt2', 'tiny-gpt2-zh']) {
    const dir = path.join(fixtures, name);
    const ref = JSON.parse(fs.readFileSync(path.join(dir, 'reference.json'), 'utf8'));
    for (const dtype of [...new Set([...dtypes, 'q8_0'])]) {
      const model = await Gpt2.load(dir, { device, dtype }).catch((e) => {
        console.log(`parity ${name} ${dtype}: not on ${device}: ${e.code} ${e.message}`);
        result.parity.push({ fixture: name, dtype, device, error: e.message });
      });
      if (!model) continue;
      let firstMismatch = [];
      for (const p of ref.prompts) {
        const g = await model.generate(p.input_ids, { maxNewTokens: ref.n_new, ignoreEos: true });
        const k = g.tokens.findIndex((t, i) => t !== p.greedy_new_ids[i]);
        firstMismatch.push(k < 0 ? ref.n_new : k);
      }
      const row = { fixture: name, dtype, device: model.info.device, stepsEqual: firstMismatch };
      result.parity.push(row);
      console.log(`parity ${name} ${dtype} on ${model.info.device}: greedy ids equal HF's for the first ${firstMismatch.join('/')} of ${ref.n_new} steps`);
      model.dispose();
    }
  }
}

async function speed(result) {
  for (const dtype of dtypes) {
    const model = await Gpt2.random({}, { device, dtype, seed: 0 }).catch((e) => console.log(`kvgpt ${dtype}: not on ${device}: ${e.message}`));
    if (!model) continue;
    await model.generate(ids(8), { maxNewTokens: 20, ignoreEos: true }); // warm-up: kernels, cuBLAS handles
    for (const ctx of contexts) {
      const runs = [];
      for (let r = 0; r < 3; r++) {
        const t0 = performance.now();
        const g = await model.generate(ids(ctx), { maxNewTokens: STEPS, ignoreEos: true });
        const wall = performance.now() - t0;
        const t = g.timings;
        runs.push({
          stepMs: median(t.stepMs), // the forward pass of one token, device-synchronized (Rust)
          perTokenMs: (t.totalMs - t.ttftMs) / (t.generatedTokens - 1), // feed + argmax + events, in Rust
          wallPerTokenMs: (wall - t.ttftMs) / (t.generatedTokens - 1), // as seen from JS
          prefillMs: t.prefillMs,
        });
      }
      const best = runs.sort((a, b) => a.perTokenMs - b.perTokenMs)[1]; // median of 3 by per-token time
      const row = { dtype, device: model.info.device, context: ctx, ...best };
      result.speed.push(row);
      console.log(`kvgpt ${dtype} ctx ${ctx}: step ${best.stepMs.toFixed(3)} ms, per token ${best.perTokenMs.toFixed(3)} ms (JS wall ${best.wallPerTokenMs.toFixed(3)}), prefill ${best.prefillMs.toFixed(2)} ms`);
    }
    model.dispose();
  }
}

// The article's experiment on this device: greedy from a 5-token prompt to total length L, cache on
// and off (as `kvgpt bench`, without its chart dependencies).
async function article(result) {
  for (const dtype of (process.env.KVGPT_ARTICLE_DTYPES ?? 'f32,f16').split(',').filter(Boolean)) {
    const model = await Gpt2.random({}, { device, dtype, seed: 0 });
    await model.generate(ids(5), { maxNewTokens: 10, ignoreEos: true });
    for (const useCache of [true, false]) {
      for (const L of [10, 110, 310, 510, 710, 910]) {
        const t0 = performance.now();
        const g = await model.generate(ids(5), { maxNewTokens: L - 5, ignoreEos: true, useCache });
        const seconds = (performance.now() - t0) / 1e3;
        result.article.push({ dtype, cache: useCache, length: L, seconds, tokens: g.tokens.length });
        console.log(`kvgpt article ${dtype} cache ${useCache ? 'on' : 'off'} L=${L}: ${seconds.toFixed(3)} s (${((seconds * 1e3) / (L - 5)).toFixed(2)} ms/token)`);
      }
    }
    model.dispose();
  }
}

(async () => {
  const result = { tool: 'kvgpt', date: new Date().toISOString(), device, parity: [], speed: [], article: [] };
  await parity(result);
  await speed(result);
  await article(result);
  fs.writeFileSync(out, JSON.stringify(result, null, 2));
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
