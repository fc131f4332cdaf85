// kvgpt beside the engines a Node user would pick instead (issue 15): node-llama-cpp (llama.cpp,
// GGUF), from one GPT-2 small checkpoint with seeded random weights (the same weights for all),
// CPU, 2 threads, greedy. Each engine at each precision (f32, 16-bit, 8-bit) runs in a process of
// its own (bench/peers/worker.mjs), the engines taking turns precision by precision, for
// KVGPT_PEERS_CYCLES cycles (default 2; medians reported): decode ms a token at contexts 16, 256,
// 512, 1000 (the prompt read in one pass, then one-token steps), time to the first token of a
// 512-token prompt, load time and peak RSS; each as a ratio to kvgpt's at the same precision.
// Saves bench/results/vs-peers.json and a chart (vs-peers-decode.svg).
// One-time setup: bash bench/peers/setup.sh (the peers' npm install, the checkpoint, its GGUFs).
// Not yet here: transformers.js (ONNX through onnxruntime-node), the other peer issue 15 names.
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const RESULTS = process.env.KVGPT_RESULTS ?? `${__dirname}/results`;
const CYCLES = Number(process.env.KVGPT_PEERS_CYCLES ?? 2);
const PRECISIONS = (process.env.KVGPT_PEERS_PRECISIONS ?? 'f32,f16,q8_0').split(',');
const ENGINES = ['kvgpt', 'llama'];
const NAMES = { kvgpt: 'kvgpt', llama: 'node-llama-cpp 3.21.1' };
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)];

function worker(engine, precision) {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [path.join(__dirname, 'peers', 'worker.mjs'), engine, precision], {
      env: { ...process.env, RAYON_NUM_THREADS: '2' },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    child.on('error', reject);
    child.on('exit', (code) => {
      const line = out.trim().split('\n').pop();
      if (code !== 0 || !line?.startsWith('{')) reject(new Error(`${engine} ${precision} worker exited with ${code}: ${out.slice(-500)}`));
      else resolve(JSON.parse(line));
    });
  });
}

async function main() {
  const work = path.join(__dirname, 'peers', 'work');
  if (!fs.existsSync(path.join(work, 'gpt2-small-random-q8_0.gguf')) || !fs.existsSync(path.join(__dirname, 'peers', 'node_modules', 'node-llama-cpp'))) {
    throw new Error('vs-peers needs its one-time setup first: bash bench/peers/setup.sh');
  }
  const runs = [];
  for (let cycle = 0; cycle < CYCLES; cycle++) {
    for (const precision of PRECISIONS) {
      const order = cycle % 2 === 0 ? ENGINES : [...ENGINES].reverse();
      for (const engine of order) {
        const r = await worker(engine, precision);
        runs.push({ cycle, ...r });
        console.log(`cycle ${cycle + 1} ${engine} ${precision}: decode ${Object.entries(r.decode).map(([c, ms]) => `${c}: ${ms.toFixed(2)}`).join(', ')} ms; prefill ${r.prefillMs.toFixed(0)} ms; load ${r.loadMs.toFixed(0)} ms; peak RSS ${r.peakRssMB.toFixed(0)} MB`);
      }
    }
  }
  const contexts = Object.keys(runs[0].decode);
  const rows = [];
  for (const precision of PRECISIONS) {
    for (const engine of ENGINES) {
      const mine = runs.filter((r) => r.engine === engine && r.precision === precision);
      rows.push({
        engine,
        precision,
        decode: Object.fromEntries(contexts.map((c) => [c, median(mine.map((r) => r.decode[c]))])),
        prefillMs: median(mine.map((r) => r.prefillMs)),
        loadMs: median(mine.map((r) => r.loadMs)),
        peakRssMB: median(mine.map((r) => r.peakRssMB)),
      });
    }
  }
  const kv = (precision) => rows.find((r) => r.engine === 'kvgpt' && r.precision === precision);
  console.log(`\nmedians of ${CYCLES} cycles; (x) = the figure over kvgpt's at the same precision (above 1: kvgpt is ahead)`);
  console.log(`| engine, precision | ${contexts.map((c) => `decode ctx ${c} (ms)`).join(' | ')} | prefill ${512} (ms) | load (ms) | peak RSS (MB) |`);
  console.log(`|---|${contexts.map(() => '---|').join('')}---|---|---|`);
  for (const r of rows) {
    const k = kv(r.precision);
    const cell = (v, base) => (r.engine === 'kvgpt' ? v.toFixed(v < 100 ? 2 : 0) : `${v.toFixed(v < 100 ? 2 : 0)} (${(v / base).toFixed(2)}x)`);
    console.log(`| ${NAMES[r.engine]} ${r.precision} | ${contexts.map((c) => cell(r.decode[c], k.decode[c])).join(' | ')} | ${cell(r.prefillMs, k.prefillMs)} | ${cell(r.loadMs, k.loadMs)} | ${cell(r.peakRssMB, k.peakRssMB)} |`);
  }
  fs.mkdirSync(RESULTS, { recursive: true });
  fs.writeFileSync(`${RESULTS}/vs-peers.json`, JSON.stringify({ date: new Date().toISOString(), cycles: CYCLES, rows, runs }, null, 2));
  const { writeChart } = require('../dist/charts');
  const points = rows.flatMap((r) => contexts.map((c) => ({ length: Number(c), series: `${NAMES[r.engine]} ${r.precision}`, value: r.decode[c] })));
  const files = await writeChart(`${RESULTS}/vs-peers-decode`, 'Decode, ms a token (CPU, 2 threads, GPT-2 small)', 'ms a token', points, false, false, 'context (tokens)');
  console.log(`saved ${RESULTS}/vs-peers.json, ${files.join(', ')}`);
}
module.exports = main;
if (require.main === module) main().catch((e) => { console.error(e); process.exit(1); });
