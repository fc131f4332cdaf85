// Issue 12 on a GPU: kvgpt's decode step per token, batch 1, at contexts 16/256/512/1000, in
// f32/f16/bf16/q8_0, through each decode path (KVGPT_CUDA_STEP, read at load): `graph` (kvgpt's
// kernels replayed as a CUDA graph, the default), `graph-nopdl` (the same graph without
// programmatic dependent launch, KVGPT_CUDA_PDL=0), `kernels` (the same kernels launched one by
// one) and `candle` (candle's ops); q8_0 has candle's path only. Then small batches (2, 4, 8
// sequences at once, greedy) through the graph and candle's path. The model is
// KVGPT_BENCH_MODEL (an HF checkpoint directory: bench/gpu/llama.sh makes the one HF and
// llama.cpp read) or, unset, GPT-2 small shapes with seeded random weights. Writes one JSON
// object to argv[2].
//
//   KVGPT_CUDA_BINARY=kvgpt.linux-x64-gnu.cuda.node node bench/gpu/step.js out.json
// Env: KVGPT_BENCH_DTYPES (f32,f16,bf16,q8_0), KVGPT_BENCH_MODES (graph,graph-nopdl,kernels,candle),
// KVGPT_STEP_ONLY=launches with KVGPT_LAUNCH_TOKENS=n (one n-token run in the first mode, f16,
// from a prompt of KVGPT_LAUNCH_CONTEXT tokens, default 8: for counting and timing kernels
// under ncu).
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const { Gpt2 } = require(process.env.KVGPT_DIST ?? path.join(__dirname, '../../dist'));

const out = process.argv[2] ?? 'kvgpt-step-gpu.json';
const device = process.env.KVGPT_BENCH_DEVICE ?? 'cuda';
const modelDir = process.env.KVGPT_BENCH_MODEL;
const dtypes = (process.env.KVGPT_BENCH_DTYPES ?? 'f32,f16,bf16,q8_0').split(',');
const modes = (process.env.KVGPT_BENCH_MODES ?? 'graph,graph-nopdl,kernels,candle').split(',');
const contexts = [16, 256, 512, 1000];
const STEPS = 21; // 20 decode steps a run (1000 + 21 fits in 1024 positions)
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)];
const ids = (n, salt = 0) => Array.from({ length: n }, (_, i) => (i * 4099 + salt * 7919 + 13) % 50257);

async function load(dtype, mode) {
  process.env.KVGPT_CUDA_STEP = mode === 'graph-nopdl' ? 'graph' : mode;
  if (mode === 'graph-nopdl') process.env.KVGPT_CUDA_PDL = '0';
  else delete process.env.KVGPT_CUDA_PDL;
  const opts = { device, dtype, maxSequences: 8 };
  return modelDir ? Gpt2.load(modelDir, opts) : Gpt2.random({}, { seed: 0, ...opts });
}

// Per-token time of `generate` from a prompt of ctx tokens: (total - TTFT) / (tokens - 1), as
// Rust timed it (the step, the argmax, the event), median of 3 runs; and the step alone.
async function decode(model, ctx) {
  const runs = [];
  for (let r = 0; r < 3; r++) {
    const g = await model.generate(ids(ctx), { maxNewTokens: STEPS, ignoreEos: true });
    const t = g.timings;
    runs.push({ perTokenMs: (t.totalMs - t.ttftMs) / (t.generatedTokens - 1), stepMs: median(t.stepMs), tokens: g.tokens });
  }
  return runs.sort((a, b) => a.perTokenMs - b.perTokenMs)[1];
}

// c generations at once from 128-token prompts, 64 new tokens each: generated tokens/s.
async function batch(model, c) {
  const t0 = performance.now();
  const rs = await Promise.all(Array.from({ length: c }, (_, i) => model.generate(ids(128, i + 1), { maxNewTokens: 64, ignoreEos: true })));
  const s = (performance.now() - t0) / 1000;
  return { tokensPerSecond: (c * 64) / s, tokenMsP50: median(rs.flatMap((r) => r.timings.stepMs)), tokens: rs.map((r) => r.tokens) };
}

(async () => {
  const result = { tool: 'kvgpt', device, model: modelDir ?? 'random GPT-2 small, seed 0', decode: [], batch: [], agreement: [] };
  if (process.env.KVGPT_STEP_ONLY === 'launches') {
    // One generation of KVGPT_LAUNCH_TOKENS new tokens from 8 in f16 through the first mode:
    // under ncu, the kernels of a 12-token run less those of a 2-token one are 10 decode steps'
    // (bench/gpu/issue12.sh).
    const model = await load('f16', modes[0]);
    const prompt = ids(Number(process.env.KVGPT_LAUNCH_CONTEXT ?? 8));
    await model.generate(prompt, { maxNewTokens: Number(process.env.KVGPT_LAUNCH_TOKENS ?? 2), ignoreEos: true });
    model.dispose();
    return;
  }
  for (const dtype of dtypes) {
    const tokensOf = {};
    for (const mode of dtype === 'q8_0' ? ['candle'] : modes) {
      const model = await load(dtype, mode).catch((e) => console.log(`kvgpt ${dtype} ${mode}: ${e.code} ${e.message}`));
      if (!model) continue;
      await model.generate(ids(8), { maxNewTokens: 20, ignoreEos: true }); // warm-up: kernels, handles
      for (const ctx of contexts) {
        // the first run at a context also captures its graphs (short and long attention)
        const row = { dtype, mode, context: ctx, ...(await decode(model, ctx)) };
        (tokensOf[ctx] ??= {})[mode] = row.tokens;
        delete row.tokens;
        result.decode.push(row);
        console.log(`kvgpt ${dtype} ${mode} ctx ${ctx}: ${row.perTokenMs.toFixed(3)} ms a token (step ${row.stepMs.toFixed(3)} ms)`);
      }
      if (dtype === 'f16' && (mode === 'graph' || mode === 'candle')) {
        for (const c of [1, 2, 4, 8]) {
          const b = await batch(model, c);
          result.batch.push({ dtype, mode, concurrency: c, tokensPerSecond: b.tokensPerSecond, tokenMsP50: b.tokenMsP50 });
          console.log(`kvgpt ${dtype} ${mode} ${c} at once: ${b.tokensPerSecond.toFixed(0)} tokens/s, token p50 ${b.tokenMsP50.toFixed(3)} ms`);
        }
      }
      model.dispose();
    }
    // Greedy agreement of the paths: steps equal to candle's path's, per context.
    for (const [ctx, byMode] of Object.entries(tokensOf)) {
      for (const mode of Object.keys(byMode).filter((m) => m !== 'candle' && byMode.candle)) {
        const a = byMode[mode], b = byMode.candle;
        const k = a.findIndex((t, i) => t !== b[i]);
        result.agreement.push({ dtype, mode, context: Number(ctx), stepsEqualToCandle: k < 0 ? a.length : k, of: a.length });
        console.log(`agreement ${dtype} ${mode} ctx ${ctx}: greedy ids equal candle's for ${k < 0 ? a.length : k} of ${a.length} steps`);
      }
    }
  }
  fs.writeFileSync(out, JSON.stringify(result, null, 2));
})().catch((e) => {
  console.error('step.js failed:', e.code, e.message);
  process.exit(1);
});
