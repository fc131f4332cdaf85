#!/usr/bin/env node
// The kvgpt command line: `kvgpt generate` streams text to stdout (or prints one JSON object
// with --json). Option ranges are checked by the library, which says what is allowed.

import { Command, InvalidArgumentError } from 'commander';
import { Gpt2, type Device, type DType } from './model';
import type { GenerateOptions } from './generate';
import { KvgptError } from './errors';
import { availableParallelism } from 'node:os';
import { formatTable, readResults, runBench, writeResults, type BenchOptions } from './bench';

function num(name: string) {
  return (v: string): number => {
    const n = Number(v);
    if (v.trim() === '' || !Number.isFinite(n)) throw new InvalidArgumentError(`${name} must be a number, got ${JSON.stringify(v)}`);
    return n;
  };
}
const collect = (v: string, prev: string[]) => [...prev, v];

/** The generate command's flags: the options that map one to one, plus the CLI's own. */
type GenerateFlags = Omit<GenerateOptions, 'stop' | 'useCache' | 'signal'> & {
  model: string;
  device: Device;
  dtype: DType;
  stop: string[];
  kvCache: boolean;
  json?: boolean;
};

async function generate(prompt: string, flags: GenerateFlags): Promise<void> {
  const model = await Gpt2.load(flags.model, { device: flags.device, dtype: flags.dtype });
  const controller = new AbortController();
  process.once('SIGINT', () => controller.abort()); // Ctrl-C ends the generation, keeps the output
  const { model: _model, device: _device, dtype: _dtype, stop, kvCache, json: _json, ...sampling } = flags;
  const options: GenerateOptions = { ...sampling, stop: stop.length ? stop : undefined, useCache: kvCache, signal: controller.signal };
  if (flags.json) {
    const r = await model.generate(prompt, options);
    process.stdout.write(JSON.stringify({ tokens: r.tokens, text: r.text, stopReason: r.stopReason, timings: r.timings }) + '\n');
    return;
  }
  const s = model.stream(prompt, options);
  for await (const chunk of s) process.stdout.write(chunk.text);
  const r = await s.result;
  const t = r.timings;
  process.stdout.write('\n');
  process.stderr.write(
    `[${r.stopReason}] ${t.promptTokens} prompt + ${t.generatedTokens} new tokens; load ${t.loadMs.toFixed(0)} ms, ` +
      `prefill ${t.prefillMs.toFixed(1)} ms, ${t.perTokenMs.toFixed(2)} ms/token, ${t.tokensPerSecond.toFixed(1)} tokens/s\n`,
  );
}

function list(v: string): number[] {
  const xs = v.split(',').map((x) => Number(x.trim()));
  if (!xs.length || xs.some((x) => !Number.isInteger(x))) throw new InvalidArgumentError(`--lengths must be integers separated by commas, got ${JSON.stringify(v)}`);
  return xs;
}

interface BenchFlags extends Omit<BenchOptions, 'progress' | 'model'> {
  model?: string;
  progress: boolean;
}

async function bench(flags: BenchFlags): Promise<void> {
  if (!Number.isInteger(flags.threads) || flags.threads < 1) throw new RangeError(`--threads must be an integer >= 1, got ${flags.threads}`);
  if (!Number.isInteger(flags.repetitions) || flags.repetitions < 1) throw new RangeError(`--repetitions must be an integer >= 1, got ${flags.repetitions}`);
  if (!['on', 'off', 'both'].includes(flags.cache)) throw new RangeError(`--cache must be on, off or both, got ${flags.cache}`);
  // candle's CPU kernels size their thread pool from this, read when the first model runs.
  process.env.RAYON_NUM_THREADS = String(flags.threads);
  const hf = flags.compare ? readResults(flags.compare) : undefined;
  const result = await runBench({ ...flags, progress: flags.progress && process.stderr.isTTY === true }, (l) => process.stderr.write(l + '\n'));
  process.stdout.write(formatTable(result, hf) + '\n');
  const files = await writeResults(result, flags);
  process.stderr.write(`wrote ${files.join(', ')}\n`);
}

export function main(argv: string[]): Promise<void> {
  const program = new Command('kvgpt').description('GPT-2 inference with an in-place KV cache').showHelpAfterError();
  program
    .command('generate')
    .description('generate text from PROMPT, streamed to stdout')
    .argument('<prompt>', 'the prompt text ("" starts from the BOS token)')
    .requiredOption('-m, --model <dir|id>', 'model directory or Hugging Face hub id')
    .option('--device <device>', "'cpu', 'cuda' or 'auto'", 'cpu')
    .option('--dtype <dtype>', "weights dtype: 'f32', 'f16', 'bf16' or 'q8_0'", 'f32')
    .option('-n, --max-new-tokens <n>', 'new tokens at most (default 50)', num('--max-new-tokens'))
    .option('-t, --temperature <t>', '0 = greedy; > 0 samples', num('--temperature'))
    .option('--top-k <k>', 'keep the k most likely tokens (0 = off, default 50)', num('--top-k'))
    .option('--top-p <p>', 'nucleus mass in (0, 1]', num('--top-p'))
    .option('--repetition-penalty <r>', 'HF repetition penalty (1 = off)', num('--repetition-penalty'))
    .option('--seed <s>', 'sampling seed', num('--seed'))
    .option('--stop <str>', 'stop before this string (repeatable)', collect, [])
    .option('--ignore-eos', 'keep generating past the EOS token')
    .option('--no-kv-cache', 'recompute the whole sequence each step')
    .option('--json', 'print one JSON object {tokens, text, stopReason, timings}')
    .action(generate);
  program
    .command('bench')
    .description("the KV-cache experiment: greedy generation to total length L, cache on and off, beside the seed article's HF figures")
    .option('-m, --model <dir|id>', 'model directory or hub id (default: GPT-2 small shapes with seeded random weights)')
    .option('--lengths <list>', 'total lengths L, comma-separated', list, [10, 110, 310, 510, 710, 910])
    .option('--cache <mode>', 'on, off or both', 'both')
    .option('-r, --repetitions <n>', 'runs per row (the median is reported)', num('--repetitions'), 1)
    .option('--device <device>', "'cpu', 'cuda' or 'auto'", 'cpu')
    .option('--dtype <dtype>', "weights dtype: 'f32', 'f16', 'bf16' or 'q8_0'", 'f32')
    .option('--threads <n>', 'CPU threads for the tensor kernels', num('--threads'), availableParallelism())
    .option('--seed <s>', 'seed of the random weights', num('--seed'), 0)
    .option('--prompt-tokens <n>', 'prompt length', num('--prompt-tokens'), 5)
    .option('-o, --out <dir>', 'where to write kvgpt-bench.json and the charts', 'bench/results')
    .option('--png', 'also write the charts as PNG')
    .option('--compare <hf.json>', 'results of bench/hf/bench_hf.py to print kvgpt/HF ratios against')
    .option('--no-progress', 'no progress bar')
    .action(bench);
  return program.parseAsync(argv).then(() => undefined);
}

if (require.main === module) {
  main(process.argv).catch((e: unknown) => {
    const err = e as Error & { code?: string };
    const code = err.code ?? (err instanceof KvgptError ? err.code : undefined);
    process.stderr.write(`kvgpt: ${err.message}${code ? ` (${code})` : ''}\n`);
    process.exitCode = err instanceof RangeError || err instanceof TypeError ? 2 : 1;
  });
}
