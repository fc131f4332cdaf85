// kvgpt beside the engines a Node user would pick instead (issue 15): node-llama-cpp (llama.cpp,
// GGUF) and transformers.js (@huggingface/transformers: ONNX through onnxruntime-node), from one
// GPT-2 small checkpoint with seeded random weights (the same weights for all), CPU, 2 threads,
// greedy. Each engine at each precision (f32, 16-bit, 8-bit) runs in processes of its own
// (bench/peers/worker.mjs), the engines taking turns precision by precision, for
// KVGPT_PEERS_CYCLES cycles (default 2; medians reported): decode ms a token at contexts 16,
// 256, 512, 1000 (the prompt read in one pass, then one-token steps), time to the first token of
// a 512-token prompt, load time and peak RSS, in one process; in another, KVGPT_PEERS_SEQS
// (default 16; 0 skips it) sequences generated at once, each a 32-token prompt of its own and 32
// new tokens, as each engine batches them (kvgpt: concurrent generate() calls on one model;
// node-llama-cpp: one context with that many sequences; transformers.js: one generate() on a
// [16, 32] batch), as generated tokens/s. Each figure as a ratio to kvgpt's at the same
// precision, above 1 where kvgpt is ahead. Also whether the engines' greedy ids agree with
// kvgpt's (a 64-token prompt's first 8, and each of the 16 sequences' first 8).
// KVGPT_PEERS_ENGINES (default kvgpt,llama,tjs) and KVGPT_PEERS_PRECISIONS pick a subset.
// Saves bench/results/vs-peers.json and a chart (vs-peers-decode.svg).
// One-time setup: bash bench/peers/setup.sh (the peers' npm install, the checkpoint, its GGUFs
// and its ONNX export).
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const RESULTS = process.env.KVGPT_RESULTS ?? `${__dirname}/results`;
const CYCLES = Number(process.env.KVGPT_PEERS_CYCLES ?? 2);
const PRECISIONS = (process.env.KVGPT_PEERS_PRECISIONS ?? 'f32,f16,q8_0').split(',');
const ENGINES = ['kvgpt', ...(process.env.KVGPT_PEERS_ENGINES ?? 'llama,tjs').split(',').filter((e) => e && e !== 'kvgpt')];
const SEQS = Number(process.env.KVGPT_PEERS_SEQS ?? 16);
const PEERS = path.join(__dirname, 'peers');
const version = (pkg) => {
  try {
    return JSON.parse(fs.readFileSync(path.join(PEERS, 'node_modules', pkg, 'package.json'), 'utf8')).version;
  } catch {
    return '?';
  }
};
const NAMES = { kvgpt: 'kvgpt', llama: `node-llama-cpp ${version('node-llama-cpp')}`, tjs: `transformers.js ${version('@huggingface/transformers')}` };
// What each engine calls the same precision, for the table.
const FORMS = { kvgpt: {}, llama: {}, tjs: { f32: 'fp32', f16: 'fp16', q8_0: 'q8' } };
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)];

function worker(engine, precision, mode) {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [path.join(PEERS, 'worker.mjs'), engine, precision, mode], {
      env: { ...process.env, RAYON_NUM_THREADS: '2', KVGPT_PEERS_SEQS: String(SEQS) },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    child.on('error', reject);
    child.on('exit', (code) => {
      const line = out.trim().split('\n').pop();
      if (code !== 0 || !line?.startsWith('{')) reject(new Error(`${engine} ${precision} ${mode} worker exited with ${code}: ${out.slice(-500)}`));
      else resolve(JSON.parse(line));
    });
  });
}

function checkSetup() {
  const work = path.join(PEERS, 'work');
  const need = {
    kvgpt: [path.join(work, 'gpt2-small-random', 'model.safetensors')],
    llama: [path.join(work, 'gpt2-small-random-q8_0.gguf'), path.join(PEERS, 'node_modules', 'node-llama-cpp')],
    tjs: [path.join(work, 'gpt2-small-random-onnx', 'onnx', 'model_quantized.onnx'), path.join(PEERS, 'node_modules', '@huggingface', 'transformers')],
  };
  for (const engine of ENGINES) {
    if (!need[engine]) throw new Error(`unknown engine ${engine}: kvgpt, llama or tjs`);
    const missing = need[engine].filter((f) => !fs.existsSync(f));
    if (missing.length) throw new Error(`vs-peers needs its one-time setup first: bash bench/peers/setup.sh (missing ${missing.join(', ')})`);
  }
}

/** Greedy ids against kvgpt's at the same precision: leading ids equal, per prompt. */
function agreement(runs, precision) {
  const prefix = (a, b) => {
    let i = 0;
    while (i < a.length && a[i] === b[i]) i++;
    return i;
  };
  const find = (engine, mode) => runs.find((r) => r.engine === engine && r.precision === precision && r.mode === mode);
  const lines = [];
  for (const engine of ENGINES.slice(1)) {
    const [k, p] = [find('kvgpt', 'decode'), find(engine, 'decode')];
    const [ks, ps] = [find('kvgpt', 'seqs'), find(engine, 'seqs')];
    const one = prefix(k.greedy, p.greedy);
    const seqs = ks && ps ? ks.greedy.map((ids, i) => prefix(ids, ps.greedy[i])) : null;
    lines.push({
      engine,
      precision,
      prompt64: `${one}/${k.greedy.length}`,
      ...(seqs && { seqsAllSame: `${seqs.filter((n) => n === ks.greedy[0].length).length}/${seqs.length}`, seqsLeadingSame: seqs }),
    });
  }
  return lines;
}

async function main() {
  checkSetup();
  const modes = SEQS > 0 ? ['decode', 'seqs'] : ['decode'];
  const runs = [];
  for (let cycle = 0; cycle < CYCLES; cycle++) {
    for (const precision of PRECISIONS) {
      const order = cycle % 2 === 0 ? ENGINES : [...ENGINES].reverse();
      for (const mode of modes) {
        for (const engine of order) {
          const r = await worker(engine, precision, mode);
          runs.push({ cycle, ...r });
          if (mode === 'decode') {
            console.log(`cycle ${cycle + 1} ${engine} ${precision}: decode ${Object.entries(r.decode).map(([c, ms]) => `${c}: ${ms.toFixed(2)}`).join(', ')} ms; prefill ${r.prefillMs.toFixed(0)} ms; load ${r.loadMs.toFixed(0)} ms; peak RSS ${r.peakRssMB.toFixed(0)} MB`);
          } else {
            console.log(`cycle ${cycle + 1} ${engine} ${precision}: ${r.seqs} sequences at once, ${r.seqs} x ${r.newTokens} tokens in ${r.wallMs.toFixed(0)} ms, ${r.tokensPerSec.toFixed(1)} tokens/s (peak RSS ${r.peakRssMB.toFixed(0)} MB)`);
          }
        }
      }
    }
  }
  const decodeRuns = runs.filter((r) => r.mode === 'decode');
  const contexts = Object.keys(decodeRuns[0].decode);
  const rows = [];
  for (const precision of PRECISIONS) {
    for (const engine of ENGINES) {
      const mine = decodeRuns.filter((r) => r.engine === engine && r.precision === precision);
      const seqs = runs.filter((r) => r.mode === 'seqs' && r.engine === engine && r.precision === precision);
      rows.push({
        engine,
        precision,
        decode: Object.fromEntries(contexts.map((c) => [c, median(mine.map((r) => r.decode[c]))])),
        prefillMs: median(mine.map((r) => r.prefillMs)),
        loadMs: median(mine.map((r) => r.loadMs)),
        peakRssMB: median(mine.map((r) => r.peakRssMB)),
        ...(seqs.length && { seqsTokensPerSec: median(seqs.map((r) => r.tokensPerSec)), seqsWallMs: median(seqs.map((r) => r.wallMs)), seqsPeakRssMB: median(seqs.map((r) => r.peakRssMB)) }),
      });
    }
  }
  const kv = (precision) => rows.find((r) => r.engine === 'kvgpt' && r.precision === precision);
  const fmt = (v) => v.toFixed(v < 100 ? 2 : 0);
  console.log(`\nmedians of ${CYCLES} cycles; (x) = the peer's figure over kvgpt's at the same precision for times and sizes, kvgpt's over the peer's for tokens/s: above 1 where kvgpt is ahead`);
  const seqsHead = SEQS > 0 ? ` ${SEQS} seqs (tokens/s) |` : '';
  console.log(`| engine, precision | ${contexts.map((c) => `decode ctx ${c} (ms)`).join(' | ')} | prefill ${512} (ms) | load (ms) | peak RSS (MB) |${seqsHead}`);
  console.log(`|---|${contexts.map(() => '---|').join('')}---|---|---|${SEQS > 0 ? '---|' : ''}`);
  for (const r of rows) {
    const k = kv(r.precision);
    // lower is better: the peer's over kvgpt's; higher is better (tokens/s): kvgpt's over the peer's.
    const cell = (v, base, higherBetter = false) => (r.engine === 'kvgpt' ? fmt(v) : `${fmt(v)} (${(higherBetter ? base / v : v / base).toFixed(2)}x)`);
    const form = FORMS[r.engine][r.precision] ?? r.precision;
    const seqsCell = SEQS > 0 ? ` ${cell(r.seqsTokensPerSec, k.seqsTokensPerSec, true)} |` : '';
    console.log(`| ${NAMES[r.engine]} ${form} | ${contexts.map((c) => cell(r.decode[c], k.decode[c])).join(' | ')} | ${cell(r.prefillMs, k.prefillMs)} | ${cell(r.loadMs, k.loadMs)} | ${cell(r.peakRssMB, k.peakRssMB)} |${seqsCell}`);
  }
  const greedy = PRECISIONS.flatMap((precision) => agreement(runs.filter((r) => r.cycle === 0), precision));
  console.log('\ngreedy ids against kvgpt\'s at the same precision (leading ids equal; random weights leave top logits close, so 8-bit forms that round differently may part):');
  for (const g of greedy) console.log(`- ${NAMES[g.engine]} ${g.precision}: 64-token prompt ${g.prompt64} ids${g.seqsAllSame ? `; ${SEQS} sequences: ${g.seqsAllSame} with all 8 equal (leading equal: ${g.seqsLeadingSame.join(' ')})` : ''}`);
  fs.mkdirSync(RESULTS, { recursive: true });
  const convention = "ratios: the peer's figure over kvgpt's (times, sizes) or kvgpt's over the peer's (tokens/s), at the same precision; above 1 where kvgpt is ahead";
  fs.writeFileSync(`${RESULTS}/vs-peers.json`, JSON.stringify({ date: new Date().toISOString(), cycles: CYCLES, names: NAMES, convention, rows, greedy, runs }, null, 2));
  const { writeChart } = require('../dist/charts');
  const points = rows.flatMap((r) => contexts.map((c) => ({ length: Number(c), series: `${NAMES[r.engine]} ${FORMS[r.engine][r.precision] ?? r.precision}`, value: r.decode[c] })));
  const files = await writeChart(`${RESULTS}/vs-peers-decode`, 'Decode, ms a token (CPU, 2 threads, GPT-2 small)', 'ms a token', points, false, false, 'context (tokens)');
  console.log(`saved ${RESULTS}/vs-peers.json, ${files.join(', ')}`);
}
module.exports = main;
if (require.main === module) main().catch((e) => { console.error(e); process.exit(1); });
