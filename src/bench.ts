// `kvgpt bench`: the seed article's experiment (greedy generation from a 5-token prompt to a
// total length L, KV cache on and off), its table beside the article's figures, the KV-cache
// bytes against the formula, RSS, JSON results, charts, and ratios against an HF run.

import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import { join } from 'node:path';
import { SingleBar, Presets } from 'cli-progress';
import { Gpt2, type Device, type DType } from './model';
import { requireBinding } from './binding';
import { writeChart, type Point } from './charts';

/** The article's table: HF GPT2LMHeadModel.generate on CPU, seconds, by total length L. */
export const ARTICLE: Record<number, { off: number; on: number }> = {
  10: { off: 0.17, on: 0.18 },
  110: { off: 8.71, on: 3.11 },
  310: { off: 40.93, on: 9.31 },
  510: { off: 92.43, on: 15.84 },
  710: { off: 178.22, on: 21.82 },
  910: { off: 332.96, on: 29.22 },
};

export interface BenchRun {
  length: number;
  cache: boolean;
  newTokens: number;
  /** Wall time of each repetition, seconds (generation only, model load excluded). */
  seconds: number[];
  medianSeconds: number;
  /** Median seconds over new tokens. */
  msPerToken: number;
  /** The last decode step of the median repetition (the growing cost without the cache). */
  lastStepMs: number;
  peakRssMB: number;
  /** RSS after the last token minus RSS after the first, MB (flat when the cache is in place). */
  rssGrowthMB: number;
  /** Of that growth, how much is V8's heap (the JS side of the benchmark loop itself), MB. */
  jsHeapGrowthMB: number;
  cacheBytes: number;
  cacheBytesFormula: number;
  /** Cache on, CPU: msPerToken over the bandwidth floor (weight bytes / measured bandwidth). */
  ofBandwidthFloor?: number;
}

export interface BenchResult {
  tool: string;
  date: string;
  machine: { cpu: string; cores: number; memGiB: number; runtime: string };
  model: string;
  config: { n_layer: number; n_head: number; n_embd: number; n_positions: number; vocab_size: number };
  device: string;
  dtype: string;
  threads: number;
  promptTokens: number;
  /**
   * CPU only: STREAM-triad bandwidth measured at the start of this run (bytes/s), the bytes a
   * decode step must read (`info.stepWeightBytes`: 4, 2 or 36/32 bytes a weight by dtype), and
   * their quotient, the floor of a decode step in ms.
   */
  bandwidth?: { bytesPerSecond: number; weightBytes: number; floorMsPerToken: number };
  runs: BenchRun[];
}


export interface BenchOptions {
  model?: string;
  lengths: number[];
  cache: 'on' | 'off' | 'both';
  repetitions: number;
  device: Device;
  dtype: DType;
  threads: number;
  seed: number;
  promptTokens: number;
  out: string;
  png: boolean;
  compare?: string;
  progress: boolean;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)];
const mb = (bytes: number) => bytes / (1024 * 1024);

/** Bytes per KV-cache element of a result's runs (4 on the CPU for every dtype). */
function cacheElementBytes(r: BenchResult): number | string {
  const run = r.runs.find((x) => x.cache && x.cacheBytesFormula > 0);
  return run ? run.cacheBytesFormula / (2 * r.config.n_layer * r.config.n_embd * run.length) : '-';
}

export async function runBench(o: BenchOptions, log: (line: string) => void): Promise<BenchResult> {
  const load = { device: o.device, dtype: o.dtype };
  const model = o.model ? await Gpt2.load(o.model, load) : await Gpt2.random({}, { seed: o.seed, ...load });
  const info = model.info;
  const described = o.model ?? `GPT-2 small shapes, seeded random weights (seed ${o.seed}); timing does not depend on the weights`;
  log(`model: ${described}`);
  log(`${info.nLayer} layers, ${info.nHead} heads, n_embd ${info.nEmbd}, ${(info.parameterCount / 1e6).toFixed(1)}M parameters, ${info.device} ${info.dtype}, ${o.threads} threads`);
  let bandwidth: BenchResult['bandwidth'];
  if (info.device === 'cpu') {
    const bytesPerSecond = await requireBinding().measureBandwidth(128, 5);
    const weightBytes = info.stepWeightBytes;
    bandwidth = { bytesPerSecond, weightBytes, floorMsPerToken: (weightBytes / bytesPerSecond) * 1000 };
    log(`memory bandwidth ${(bytesPerSecond / 1e9).toFixed(1)} GB/s (STREAM triad, 3 x 128 MiB); ${(weightBytes / 1e6).toFixed(0)} MB of weights a step: floor ${bandwidth.floorMsPerToken.toFixed(1)} ms/token`);
  }
  const lengths = o.lengths.filter((l) => l > o.promptTokens && l <= info.nPositions);
  if (lengths.length !== o.lengths.length) {
    throw Object.assign(new RangeError(`lengths must be in (${o.promptTokens}, ${info.nPositions}] (prompt tokens, n_positions), got ${o.lengths.join(',')}`), { code: 'KVGPT_OPTION_RANGE' });
  }
  const modes = o.cache === 'both' ? [true, false] : [o.cache === 'on'];
  const prompt = Array.from({ length: o.promptTokens }, (_, i) => (i * 4099 + 13) % info.vocabSize);
  const totalTokens = lengths.reduce((s, l) => s + (l - o.promptTokens), 0) * modes.length * o.repetitions;
  const bar = o.progress ? new SingleBar({ format: ' {bar} {percentage}% | {value}/{total} tokens | L={length} cache {cache} | {eta_formatted} left', etaBuffer: 200 }, Presets.shades_classic) : undefined;
  bar?.start(totalTokens, 0, { length: '-', cache: '-' });
  const runs: BenchRun[] = [];
  let done = 0;
  for (const cache of modes) {
    for (const length of lengths) {
      const newTokens = length - o.promptTokens;
      const seconds: number[] = [];
      const lastSteps: number[] = [];
      let peak = 0;
      let growth = 0;
      let heapGrowth = 0;
      let cacheBytes = 0;
      for (let rep = 0; rep < o.repetitions; rep++) {
        let afterFirst: NodeJS.MemoryUsage | undefined;
        let mem = process.memoryUsage();
        const t0 = performance.now();
        const s = model.stream(prompt, { maxNewTokens: newTokens, ignoreEos: true, useCache: cache });
        for await (const _ of s) {
          mem = process.memoryUsage();
          afterFirst ??= mem;
          peak = Math.max(peak, mem.rss);
          bar?.update(++done, { length, cache: cache ? 'on' : 'off' });
        }
        const r = await s.result;
        seconds.push((performance.now() - t0) / 1000);
        lastSteps.push(r.timings.stepMs.at(-1) ?? r.timings.prefillMs);
        if (afterFirst) {
          growth = Math.max(growth, mem.rss - afterFirst.rss);
          heapGrowth = Math.max(heapGrowth, mem.heapTotal - afterFirst.heapTotal);
        }
        cacheBytes = r.cacheBytes;
      }
      const med = median(seconds);
      runs.push({
        length,
        cache,
        newTokens,
        seconds,
        medianSeconds: med,
        msPerToken: (med * 1000) / newTokens,
        lastStepMs: median(lastSteps),
        peakRssMB: mb(peak),
        rssGrowthMB: mb(growth),
        jsHeapGrowthMB: mb(heapGrowth),
        cacheBytes,
        cacheBytesFormula: cache ? info.cacheBytesPerToken * length : 0,
        ofBandwidthFloor: cache && bandwidth ? (med * 1000) / newTokens / bandwidth.floorMsPerToken : undefined,
      });
    }
  }
  bar?.stop();
  const result: BenchResult = {
    tool: 'kvgpt',
    date: new Date().toISOString(),
    machine: { cpu: cpus()[0]?.model ?? 'unknown', cores: cpus().length, memGiB: Math.round(totalmem() / 2 ** 30), runtime: `node ${process.version}` },
    model: described,
    config: { n_layer: info.nLayer, n_head: info.nHead, n_embd: info.nEmbd, n_positions: info.nPositions, vocab_size: info.vocabSize },
    device: info.device,
    dtype: info.dtype,
    threads: o.threads,
    promptTokens: o.promptTokens,
    bandwidth,
    runs,
  };
  model.dispose();
  return result;
}

function pad(cells: string[], widths: number[]): string {
  return cells.map((c, i) => c.padStart(widths[i])).join('  ');
}

/** The table: ours beside the article's, ms/token, the cache's speedup, RSS, cache bytes. */
export function formatTable(r: BenchResult, hf?: BenchResult): string {
  const lengths = [...new Set(r.runs.map((x) => x.length))];
  const find = (res: BenchResult | undefined, l: number, c: boolean) => res?.runs.find((x) => x.length === l && x.cache === c);
  const head = ['L', 'off s', 'article', 'on s', 'article', 'off ms/tok', 'on ms/tok', 'x floor', 'speedup', 'peak RSS MB', 'RSS growth MB', 'of it JS heap', 'cache bytes', 'formula'];
  if (hf) head.push('HF off s', 'HF on s', 'off ratio', 'on ratio');
  const rows = lengths.map((l) => {
    const off = find(r, l, false);
    const on = find(r, l, true);
    const a = ARTICLE[l];
    const s = (x?: number, d = 2) => (x === undefined ? '-' : x.toFixed(d));
    const row = [
      String(l), s(off?.medianSeconds), s(a?.off), s(on?.medianSeconds), s(a?.on), s(off?.msPerToken, 1), s(on?.msPerToken, 1), s(on?.ofBandwidthFloor, 2),
      off && on ? `${(off.medianSeconds / on.medianSeconds).toFixed(2)}x` : '-',
      s(Math.max(on?.peakRssMB ?? 0, off?.peakRssMB ?? 0), 0), s(on?.rssGrowthMB, 1), s(on?.jsHeapGrowthMB, 1), on ? String(on.cacheBytes) : '-', on ? String(on.cacheBytesFormula) : '-',
    ];
    if (hf) {
      const hoff = find(hf, l, false);
      const hon = find(hf, l, true);
      row.push(s(hoff?.medianSeconds), s(hon?.medianSeconds),
        off && hoff ? (off.medianSeconds / hoff.medianSeconds).toFixed(2) : '-', on && hon ? (on.medianSeconds / hon.medianSeconds).toFixed(2) : '-');
    }
    return row;
  });
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i].length)));
  const lines = [pad(head, widths), ...rows.map((row) => pad(row, widths))];
  const notes = [
    `seconds: median of ${r.runs[0]?.seconds.length ?? 0} run(s) of greedy generation from a ${r.promptTokens}-token prompt to total length L; 'article' = the seed article's HF figures (its machine, not this one)`,
    `speedup = cache off / cache on; cache bytes = allocated K/V buffers, formula = 2 x n_layer x n_embd x L x 1 x bytes per element (${cacheElementBytes(r)}: the cache's dtype on this device)`,
  ];
  if (r.bandwidth) {
    notes.push(`x floor = cache-on ms/token over the bandwidth floor: ${(r.bandwidth.weightBytes / 1e6).toFixed(0)} MB of weights / ${(r.bandwidth.bytesPerSecond / 1e9).toFixed(1)} GB/s (STREAM triad measured in this run) = ${r.bandwidth.floorMsPerToken.toFixed(1)} ms`);
  }
  if (hf) notes.push(`HF = ${hf.tool} measured in ${hf.model} (${hf.machine.runtime}, ${hf.threads} threads); ratio = kvgpt / HF (below 1: kvgpt faster)`);
  return [...lines, '', ...notes].join('\n');
}

export async function writeResults(r: BenchResult, o: BenchOptions): Promise<string[]> {
  mkdirSync(o.out, { recursive: true });
  const json = join(o.out, 'kvgpt-bench.json');
  writeFileSync(json, JSON.stringify(r, null, 2) + '\n');
  const total: Point[] = [];
  const perToken: Point[] = [];
  for (const x of r.runs) {
    const series = `kvgpt, cache ${x.cache ? 'on' : 'off'}`;
    total.push({ length: x.length, series, value: x.medianSeconds });
    perToken.push({ length: x.length, series, value: x.msPerToken });
  }
  for (const [l, a] of Object.entries(ARTICLE)) {
    if (!r.runs.some((x) => x.length === Number(l))) continue;
    total.push({ length: Number(l), series: 'article (HF), cache off', value: a.off }, { length: Number(l), series: 'article (HF), cache on', value: a.on });
  }
  const files = [json];
  files.push(...(await writeChart(join(o.out, 'total-time'), 'Generation time against total length', 'seconds', total, o.png)));
  files.push(...(await writeChart(join(o.out, 'per-token'), 'Time per generated token against total length', 'ms per token', perToken, o.png)));
  return files;
}

export function readResults(path: string): BenchResult {
  const r = JSON.parse(readFileSync(path, 'utf8')) as BenchResult;
  if (!Array.isArray(r.runs)) throw new TypeError(`${path} is not a bench results file (no "runs" array)`);
  return r;
}
