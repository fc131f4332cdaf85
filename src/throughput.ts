// `kvgpt bench --concurrency LIST`: throughput of the batching engine. For each concurrency c,
// c generations of the same shape (a prompt of P tokens, N new tokens, greedy, EOS ignored)
// start at once on one model; reported: aggregate generated tokens/s (and as a multiple of
// c = 1 in the same run), time to first token and per-token latency percentiles, and the
// engine's mean batch size. JSON, a table and a chart.

import { mkdirSync, writeFileSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import { join } from 'node:path';
import { Gpt2, type Device, type DType } from './model';
import { writeChart, type Point } from './charts';

export interface ThroughputOptions {
  model?: string;
  concurrency: number[];
  promptTokens: number;
  newTokens: number;
  repetitions: number;
  device: Device;
  dtype: DType;
  threads: number;
  seed: number;
  maxSequences?: number;
  maxStepTokens?: number;
  prefillChunk?: number;
  out: string;
  png: boolean;
}

export interface Percentiles {
  p50: number;
  p90: number;
  p99: number;
}

export interface ThroughputRun {
  concurrency: number;
  /** Wall time of each repetition, from the first call to the last result, seconds. */
  seconds: number[];
  medianSeconds: number;
  /** Generated tokens (c x N) over the median wall time. */
  tokensPerSecond: number;
  /** tokensPerSecond over that of concurrency 1 in this run (when measured). */
  ofOne?: number;
  ttftMs: Percentiles;
  /** Every decode step of every request (the time between its tokens). */
  tokenMs: Percentiles;
  meanBatchSize: number;
  steps: number;
  /** Per forward pass, ms: launching it (all of it on the CPU), waiting for the device, and after it (argmax or sampling, stops, events). */
  perPass: { launchMs: number; deviceMs: number; afterMs: number };
}

export interface ThroughputResult {
  tool: string;
  date: string;
  machine: { cpu: string; cores: number; memGiB: number; runtime: string };
  model: string;
  device: string;
  dtype: string;
  threads: number;
  promptTokens: number;
  newTokens: number;
  engine: { maxSequences: number; maxStepTokens: number; prefillChunk: number };
  runs: ThroughputRun[];
}

/** Nearest-rank percentiles. */
export function percentiles(xs: number[]): Percentiles {
  const s = [...xs].sort((a, b) => a - b);
  const at = (q: number) => (s.length ? s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)] : 0);
  return { p50: at(0.5), p90: at(0.9), p99: at(0.99) };
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)];

export async function runThroughput(o: ThroughputOptions, log: (line: string) => void): Promise<ThroughputResult> {
  const most = Math.max(...o.concurrency);
  const load = { device: o.device, dtype: o.dtype, maxSequences: o.maxSequences ?? most, maxStepTokens: o.maxStepTokens, prefillChunk: o.prefillChunk };
  const model = o.model ? await Gpt2.load(o.model, load) : await Gpt2.random({}, { seed: o.seed, ...load });
  const info = model.info;
  if (o.promptTokens < 1 || o.promptTokens + o.newTokens > info.nPositions) {
    model.dispose();
    throw Object.assign(new RangeError(`--prompt-tokens + --new-tokens must fit in n_positions (${info.nPositions}), got ${o.promptTokens} + ${o.newTokens}`), { code: 'KVGPT_OPTION_RANGE' });
  }
  const engine = model.engineStats();
  const described = o.model ?? `GPT-2 small shapes, seeded random weights (seed ${o.seed}); timing does not depend on the weights`;
  log(`model: ${described}; ${info.device} ${info.dtype}, ${o.threads} threads; engine: ${engine.maxSequences} sequences, ${engine.maxStepTokens} tokens a step, chunks of ${engine.prefillChunk}`);
  const prompt = (salt: number) => Array.from({ length: o.promptTokens }, (_, i) => (i * 4099 + salt * 7919 + 13) % info.vocabSize);
  const options = { maxNewTokens: o.newTokens, ignoreEos: true, temperature: 0 };
  await model.generate(prompt(0).slice(0, 8), { ...options, maxNewTokens: 2 }); // warm-up
  const runs: ThroughputRun[] = [];
  for (const c of o.concurrency) {
    const seconds: number[] = [];
    let ttft: number[] = [];
    let steps: number[] = [];
    let meanBatch = 0;
    let passes = 0;
    let perPass = { launchMs: 0, deviceMs: 0, afterMs: 0 };
    for (let rep = 0; rep < o.repetitions; rep++) {
      const before = model.engineStats();
      const t0 = performance.now();
      const results = await Promise.all(Array.from({ length: c }, (_, i) => model.generate(prompt(rep * most + i + 1), options)));
      seconds.push((performance.now() - t0) / 1000);
      const after = model.engineStats();
      ttft = results.map((r) => r.timings.ttftMs);
      steps = results.flatMap((r) => r.timings.stepMs);
      passes = after.steps - before.steps;
      meanBatch = passes > 0 ? (after.sequences - before.sequences) / passes : 0;
      const per = (x: number) => (passes > 0 ? x / passes : 0);
      perPass = {
        launchMs: per(after.busyMs - before.busyMs - (after.syncMs - before.syncMs)),
        deviceMs: per(after.syncMs - before.syncMs),
        afterMs: per(after.sampleMs - before.sampleMs),
      };
    }
    const med = median(seconds);
    const run: ThroughputRun = {
      concurrency: c,
      seconds,
      medianSeconds: med,
      tokensPerSecond: (c * o.newTokens) / med,
      ttftMs: percentiles(ttft),
      tokenMs: percentiles(steps),
      meanBatchSize: meanBatch,
      steps: passes,
      perPass,
    };
    runs.push(run);
    log(
      `concurrency ${c}: ${run.tokensPerSecond.toFixed(1)} tokens/s (${med.toFixed(2)} s), TTFT p50 ${run.ttftMs.p50.toFixed(0)} ms, token p50 ${run.tokenMs.p50.toFixed(1)} ms, ` +
        `mean batch ${meanBatch.toFixed(1)}; a pass: launch ${perPass.launchMs.toFixed(2)} + device ${perPass.deviceMs.toFixed(2)} + after ${perPass.afterMs.toFixed(2)} ms`,
    );
  }
  const one = runs.find((r) => r.concurrency === 1);
  if (one) for (const r of runs) r.ofOne = r.tokensPerSecond / one.tokensPerSecond;
  model.dispose();
  return {
    tool: 'kvgpt',
    date: new Date().toISOString(),
    machine: { cpu: cpus()[0]?.model ?? 'unknown', cores: cpus().length, memGiB: Math.round(totalmem() / 2 ** 30), runtime: `node ${process.version}` },
    model: described,
    device: info.device,
    dtype: info.dtype,
    threads: o.threads,
    promptTokens: o.promptTokens,
    newTokens: o.newTokens,
    engine: { maxSequences: engine.maxSequences, maxStepTokens: engine.maxStepTokens, prefillChunk: engine.prefillChunk },
    runs,
  };
}

export function formatThroughput(r: ThroughputResult): string {
  const head = ['concurrency', 'tokens/s', 'x c=1', 'seconds', 'TTFT p50 ms', 'p90', 'p99', 'token p50 ms', 'p90', 'p99', 'mean batch', 'passes'];
  const f = (x: number | undefined, d: number) => (x === undefined ? '-' : x.toFixed(d));
  const rows = r.runs.map((x) => [
    String(x.concurrency), f(x.tokensPerSecond, 1), f(x.ofOne, 2), f(x.medianSeconds, 2),
    f(x.ttftMs.p50, 0), f(x.ttftMs.p90, 0), f(x.ttftMs.p99, 0), f(x.tokenMs.p50, 1), f(x.tokenMs.p90, 1), f(x.tokenMs.p99, 1),
    f(x.meanBatchSize, 1), String(x.steps),
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padStart(widths[i])).join('  ');
  return [
    line(head),
    ...rows.map(line),
    '',
    `c generations at once, each a ${r.promptTokens}-token prompt and ${r.newTokens} new tokens (greedy, EOS ignored), ${r.device} ${r.dtype}, ${r.threads} threads; ` +
      `tokens/s = c x ${r.newTokens} / wall time (median of ${r.runs[0]?.seconds.length ?? 0}); token ms = each decode step a request rode in; ` +
      `engine: ${r.engine.maxSequences} sequences, ${r.engine.maxStepTokens} tokens a step, chunks of ${r.engine.prefillChunk}`,
  ].join('\n');
}

export async function writeThroughput(r: ThroughputResult, out: string, png: boolean): Promise<string[]> {
  mkdirSync(out, { recursive: true });
  const json = join(out, 'kvgpt-throughput.json');
  writeFileSync(json, JSON.stringify(r, null, 2) + '\n');
  const points: Point[] = r.runs.map((x) => ({ length: x.concurrency, series: `kvgpt ${r.device} ${r.dtype}`, value: x.tokensPerSecond }));
  const chart = await writeChart(join(out, 'throughput'), 'Generated tokens per second against concurrent sequences', 'tokens/s', points, png, false, 'concurrent sequences');
  return [json, ...chart];
}
