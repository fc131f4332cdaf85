// Issue 11's CPU table in one run: c generations at once (128-token prompts, 128 new tokens,
// greedy, EOS ignored) for c = 1, 4, 16, 64, kvgpt in f32, f16 and q8_0 (its engine batching
// the c calls) and HF transformers f32 (`generate` on a batch of c, its default dynamic cache,
// in the long-lived worker bench/hf/hf_worker.py), taking turns level by level so this shared
// machine's drift hits them alike. Prints generated tokens/s, each as a multiple of its own
// c = 1 and of HF's at the same c; saves bench/results/vs-hf-throughput.json.
// Needs Python with torch and transformers (KVGPT_HF_PYTHON, as vs-hf); `npm run bench --
// vs-hf-throughput`. KVGPT_CONCURRENCY=1,4 and KVGPT_NEW=32 shorten it.
const fs = require('node:fs');
const { hfWorker } = require('./vs-hf.bench.js');
const { RESULTS } = require('./common');
const { runThroughput } = require('../dist/throughput');

const LEVELS = (process.env.KVGPT_CONCURRENCY ?? '1,4,16,64').split(',').map(Number);
const PROMPT = 128;
const NEW = Number(process.env.KVGPT_NEW ?? 128);
const DTYPES = (process.env.KVGPT_BENCH_DTYPES ?? 'f32,f16,q8_0').split(',');

async function main() {
  const hf = hfWorker();
  await hf.ready;
  await hf.call(`batch 1 8 2`); // warm-up
  const rows = [];
  for (const c of LEVELS) {
    for (const dtype of DTYPES) {
      const r = await runThroughput(
        { concurrency: [c], promptTokens: PROMPT, newTokens: NEW, repetitions: 1, device: 'cpu', dtype, threads: 2, seed: 0, maxSequences: Math.max(...LEVELS), out: '', png: false },
        () => {},
      );
      const run = r.runs[0];
      rows.push({ engine: `kvgpt ${dtype}`, concurrency: c, tokensPerSecond: run.tokensPerSecond, seconds: run.medianSeconds, ttftP50Ms: run.ttftMs.p50, tokenP50Ms: run.tokenMs.p50, meanBatchSize: run.meanBatchSize });
      console.log(`kvgpt ${dtype} c=${c}: ${run.tokensPerSecond.toFixed(1)} tokens/s (${run.medianSeconds.toFixed(2)} s, mean batch ${run.meanBatchSize.toFixed(1)})`);
    }
    const a = await hf.call(`batch ${c} ${PROMPT} ${NEW}`);
    const seconds = a.ms / 1000;
    rows.push({ engine: 'HF f32', concurrency: c, tokensPerSecond: (c * NEW) / seconds, seconds });
    console.log(`HF f32 c=${c}: ${((c * NEW) / seconds).toFixed(1)} tokens/s (${seconds.toFixed(2)} s)`);
  }
  hf.close();
  const engines = [...new Set(rows.map((r) => r.engine))];
  const at = (e, c) => rows.find((r) => r.engine === e && r.concurrency === c);
  console.log(`\ngenerated tokens/s (x its own c=1; x HF at that c), ${PROMPT}-token prompts, ${NEW} new tokens:`);
  console.log(['engine', ...LEVELS.map((c) => `c=${c}`)].join(' | '));
  for (const e of engines) {
    const cells = LEVELS.map((c) => {
      const r = at(e, c);
      const one = at(e, LEVELS[0]);
      const h = at('HF f32', c);
      r.ofOne = r.tokensPerSecond / one.tokensPerSecond;
      r.ofHf = r.tokensPerSecond / h.tokensPerSecond;
      return `${r.tokensPerSecond.toFixed(1)} (${r.ofOne.toFixed(2)}x; ${r.ofHf.toFixed(2)}x HF)`;
    });
    console.log([e, ...cells].join(' | '));
  }
  fs.mkdirSync(RESULTS, { recursive: true });
  fs.writeFileSync(`${RESULTS}/vs-hf-throughput.json`, JSON.stringify({ date: new Date().toISOString(), promptTokens: PROMPT, newTokens: NEW, rows }, null, 2));
}
module.exports = main;
if (require.main === module) main().catch((e) => { console.error(e); process.exit(1); });
