// kvgpt's batching engine on a GPU, the workload of issue 11's table: c concurrent generations
// of GPT-2 small shapes (seeded random weights), each a 128-token prompt and 128 new tokens,
// greedy, EOS ignored, for c = 1, 8, 32, 64, 128, 256; aggregate generated tokens/s, TTFT and
// per-token latency percentiles, the engine's mean batch size. Also greedy parity of batched
// against solo runs on the fixtures. Writes one JSON object to argv[2].
//
//   KVGPT_CUDA_BINARY=kvgpt.linux-x64-gnu.cuda.node node bench/gpu/throughput.js out.json
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const dist = process.env.KVGPT_DIST ?? path.join(__dirname, '../../dist');
const { Gpt2 } = require(dist);
const { runThroughput, formatThroughput } = require(path.join(dist, 'throughput.js'));
const fixtures = process.env.KVGPT_FIXTURES ?? path.join(__dirname, '../../test/fixtures');

const out = process.argv[2] ?? 'kvgpt-throughput-gpu.json';
const device = process.env.KVGPT_BENCH_DEVICE ?? 'cuda';
const dtypes = (process.env.KVGPT_BENCH_DTYPES ?? 'f16').split(',');
const concurrency = (process.env.KVGPT_CONCURRENCY ?? '1,8,32,64,128,256').split(',').map(Number);

async function parity(result) {
  const dir = path.join(fixtures, 'tiny-gpt2');
  const ref = JSON.parse(fs.readFileSync(path.join(dir, 'reference.json'), 'utf8'));
  for (const dtype of ['f32', 'f16']) {
    const model = await Gpt2.load(dir, { device, dtype });
    const opts = { maxNewTokens: ref.n_new, ignoreEos: true };
    const alone = [];
    for (const p of ref.prompts) alone.push((await model.generate(p.input_ids, opts)).tokens);
    const together = (await Promise.all(ref.prompts.map((p) => model.generate(p.input_ids, opts)))).map((r) => r.tokens);
    const stats = model.engineStats();
    const hf = ref.batch_left_padded_greedy_new_ids;
    const eq = (a, b) => { const k = a.findIndex((t, i) => t !== b[i]); return k < 0 ? a.length : k; };
    const row = {
      dtype,
      batchedEqualsSolo: together.map((t, i) => eq(t, alone[i])),
      batchedEqualsHf: together.map((t, i) => eq(t, hf[i])),
      maxBatch: stats.maxBatch,
    };
    result.parity.push(row);
    console.log(`batched parity ${dtype}: steps equal to solo ${row.batchedEqualsSolo.join('/')}, to HF's batch ${row.batchedEqualsHf.join('/')} of ${ref.n_new}; max batch ${row.maxBatch}`);
    model.dispose();
  }
}

(async () => {
  const result = { tool: 'kvgpt', device, parity: [], throughput: [] };
  await parity(result);
  for (const dtype of dtypes) {
    const r = await runThroughput(
      { concurrency, promptTokens: 128, newTokens: 128, repetitions: Number(process.env.KVGPT_REPS ?? 2), device, dtype, threads: 1, seed: 0,
        maxSequences: Math.max(...concurrency), maxStepTokens: process.env.KVGPT_STEP_TOKENS ? Number(process.env.KVGPT_STEP_TOKENS) : undefined,
        prefillChunk: process.env.KVGPT_CHUNK ? Number(process.env.KVGPT_CHUNK) : undefined, out: '', png: false },
      (l) => console.log(l),
    );
    console.log(formatThroughput(r));
    result.throughput.push(r);
  }
  fs.writeFileSync(out, JSON.stringify(result, null, 2));
})().catch((e) => {
  console.error('throughput failed:', e.code, e.message);
  process.exit(1);
});
