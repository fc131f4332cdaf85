// kvgpt against HF transformers in one run (issue 4's ratios): a decode step at context 16,
// 256, 512, 1000 (kvgpt f32, f16 and q8_0, HF f32) and a prefill of 512 tokens, each a benny
// case.
// HF's calls go to a long-lived Python worker (bench/hf/hf_worker.py) over a pipe; its `ping`
// case gives the pipe's cost. The three contenders of one workload run one after another, so
// this shared machine's drift hits them alike. Before the cases, the memory bandwidth is
// measured (STREAM triad on the kernels' pool) and each decode step is also given as a multiple
// of its floor: the bytes of weights it reads over that bandwidth.
// Needs Python with torch and transformers: KVGPT_HF_PYTHON (default .venv-hf/bin/python, made
// as the README's Benchmarks section says). Prints the ratios; saves bench/results/vs-hf.json
// (benny's) and vs-hf-ratios.json.
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const readline = require('node:readline');
const { b, ids, serial, suite, RESULTS } = require('./common');
const { Gpt2 } = require('../dist');
const { requireBinding } = require('../dist/binding');

const CONTEXTS = (process.env.KVGPT_BENCH_CONTEXTS ?? '16,256,512,1000').split(',').map(Number);
const PREFILL = 512;

/** The HF worker: `call('step 16')` resolves to its JSON answer. */
function hfWorker() {
  const python = process.env.KVGPT_HF_PYTHON ?? `${__dirname}/../.venv-hf/bin/python`;
  const child = spawn(python, [`${__dirname}/hf/hf_worker.py`, '--threads', '2'], { stdio: ['pipe', 'pipe', 'inherit'] });
  const waiting = [];
  const failed = new Promise((_, reject) => {
    child.on('error', (e) => reject(new Error(`cannot start the HF worker with ${python}: ${e.message} (set KVGPT_HF_PYTHON)`)));
    child.on('exit', (code) => reject(new Error(`the HF worker exited with code ${code}`)));
  });
  failed.catch(() => {});
  readline.createInterface({ input: child.stdout }).on('line', (line) => waiting.shift()?.(JSON.parse(line)));
  const next = () => Promise.race([new Promise((resolve) => waiting.push(resolve)), failed]);
  const ready = next();
  const call = async (cmd) => {
    const answer = next();
    child.stdin.write(`${cmd}\n`);
    const a = await answer;
    if (a.error) throw new Error(`HF worker: ${a.error}`);
    return a;
  };
  return { ready, call, close: () => child.stdin.end() };
}

async function main() {
  const hf = hfWorker();
  const hello = await hf.ready;
  const f32 = await Gpt2.random({}, { seed: 0, dtype: 'f32' });
  const f16 = await Gpt2.random({}, { seed: 0, dtype: 'f16' });
  const q8 = await Gpt2.random({}, { seed: 0, dtype: 'q8_0' });
  const contenders = { 'kvgpt f32': f32, 'kvgpt f16': f16, 'kvgpt q8_0': q8 };
  const bandwidth = await requireBinding().measureBandwidth(128, 5);
  console.log(`HF worker: torch ${hello.torch}, ${hello.threads} threads; triad ${(bandwidth / 1e9).toFixed(1)} GB/s`);

  const cases = [b.add('HF pipe round trip (ping)', serial(() => hf.call('ping')))];
  for (const ctx of CONTEXTS) {
    for (const [name, model] of Object.entries(contenders)) {
      const session = model.session({ capacity: ctx + 1 });
      await session.feed(ids(ctx)); // the prefill, outside the timed function
      cases.push(
        b.add(
          `${name} decode step at context ${ctx}`,
          serial(async () => {
            session.truncate(ctx);
            await session.feed([464]);
          }),
        ),
      );
    }
    await hf.call(`prepare ${ctx}`);
    cases.push(b.add(`HF f32 decode step at context ${ctx}`, serial(() => hf.call(`step ${ctx}`))));
  }
  for (const [name, model] of Object.entries(contenders)) {
    const session = model.session({ capacity: PREFILL });
    const prompt = ids(PREFILL);
    cases.push(
      b.add(
        `${name} prefill ${PREFILL} tokens`,
        serial(async () => {
          session.truncate(0);
          await session.feed(prompt);
        }),
      ),
    );
  }
  cases.push(b.add(`HF f32 prefill ${PREFILL} tokens`, serial(() => hf.call(`prefill ${PREFILL}`))));

  const report = (summary) => {
    const ms = Object.fromEntries(summary.results.map((r) => [r.name, r.details.median * 1000]));
    const rows = [];
    const line = (workload, hfName) => {
      const hfMs = ms[`HF f32 ${workload}`];
      for (const name of Object.keys(contenders)) {
        const mine = ms[`${name} ${workload}`];
        const model = contenders[name];
        const floorMs = workload.startsWith('decode') ? (model.info.stepWeightBytes / bandwidth) * 1000 : undefined;
        rows.push({ workload, contender: name, ms: mine, hfMs, ofHf: mine / hfMs, floorMs, ofFloor: floorMs && mine / floorMs });
      }
      rows.push({ workload, contender: hfName, ms: hfMs, hfMs, ofHf: 1 });
    };
    for (const ctx of CONTEXTS) line(`decode step at context ${ctx}`, 'HF f32');
    line(`prefill ${PREFILL} tokens`, 'HF f32');
    console.log(`\nmedians, one run (triad ${(bandwidth / 1e9).toFixed(1)} GB/s; HF's include the pipe, ping ${ms['HF pipe round trip (ping)'].toFixed(2)} ms):`);
    console.log('| workload | contender | ms | x HF | x floor |\n|---|---|---|---|---|');
    for (const r of rows) {
      console.log(`| ${r.workload} | ${r.contender} | ${r.ms.toFixed(2)} | ${r.ofHf.toFixed(2)} | ${r.ofFloor ? r.ofFloor.toFixed(2) : ''} |`);
    }
    fs.writeFileSync(`${RESULTS}/vs-hf-ratios.json`, JSON.stringify({ date: new Date().toISOString(), bandwidth, pingMs: ms['HF pipe round trip (ping)'], torch: hello.torch, rows }, null, 2));
    hf.close();
  };
  return suite('vs-hf', cases, report);
}
module.exports = main;
module.exports.hfWorker = hfWorker;
if (require.main === module) main();
