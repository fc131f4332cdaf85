#!/usr/bin/env node
// The kvgpt command line: `kvgpt generate` streams text to stdout (or prints one JSON object
// with --json), or runs a file of prompts as one batch; `kvgpt perplexity` and `kvgpt score`
// score text; `kvgpt bench` measures. Option ranges are checked by the library, which says what
// is allowed.

import { Command, InvalidArgumentError } from 'commander';
import { readFileSync } from 'node:fs';
import { Gpt2, type Device, type DType, type LoadOptions } from './model';
import type { GenerateOptions } from './generate';
import { KvgptError } from './errors';
import { availableParallelism } from 'node:os';
import { formatTable, readResults, runBench, writeResults, type BenchOptions } from './bench';
import { formatThroughput, runThroughput, writeThroughput } from './throughput';
import { perplexity, score } from './perplexity';
import { serve } from './server';

interface ServeFlags extends EngineFlags {
  model: string;
  host: string;
  port: number;
  device: Device;
  dtype: DType;
  apiKey?: string;
  maxQueue?: number;
  shutdownTimeout: number;
}

/** Serves until SIGINT or SIGTERM, then lets running requests finish (up to --shutdown-timeout) and exits 0. */
async function serveCommand(flags: ServeFlags): Promise<void> {
  const { model, host, port, device, dtype, apiKey, maxQueue, shutdownTimeout, ...engine } = flags;
  const server = await serve(model, { host, port, device, dtype, apiKey: apiKey ?? process.env.KVGPT_API_KEY, maxQueue, ...engine });
  process.stderr.write(`kvgpt serve: ${server.model.info.dir} on ${server.url} (POST /v1/completions, GET /v1/models, GET /health, GET /metrics)\n`);
  await new Promise<void>((resolve) => {
    const stop = (signal: string) => {
      process.stderr.write(`kvgpt serve: ${signal}: finishing running requests (at most ${shutdownTimeout} s)\n`);
      server.close(shutdownTimeout * 1000).then(resolve, resolve);
    };
    process.once('SIGINT', () => stop('SIGINT'));
    process.once('SIGTERM', () => stop('SIGTERM'));
  });
  server.model.dispose();
}

function num(name: string) {
  return (v: string): number => {
    const n = Number(v);
    if (v.trim() === '' || !Number.isFinite(n)) throw new InvalidArgumentError(`${name} must be a number, got ${JSON.stringify(v)}`);
    return n;
  };
}
const collect = (v: string, prev: string[]) => [...prev, v];

/** The engine's limits as flags (`--max-sequences` ...). */
interface EngineFlags {
  maxSequences?: number;
  maxStepTokens?: number;
  prefillChunk?: number;
}

/** The generate command's flags: the options that map one to one, plus the CLI's own. */
type GenerateFlags = Omit<GenerateOptions, 'stop' | 'useCache' | 'signal'> &
  EngineFlags & {
    model: string;
    device: Device;
    dtype: DType;
    stop: string[];
    kvCache: boolean;
    json?: boolean;
    prompts?: string;
  };

/** The prompts of a --prompts file (`-`: standard input): one per line, blank lines skipped. */
function readPrompts(path: string): string[] {
  let text: string;
  try {
    text = readFileSync(path === '-' ? 0 : path, 'utf8');
  } catch (e) {
    throw new KvgptError('KVGPT_FILE_NOT_FOUND', `cannot read the prompts file ${path}: ${(e as Error).message}`);
  }
  return text.split('\n').map((l) => l.replace(/\r$/, '')).filter((l) => l.trim() !== '');
}

async function generate(prompt: string | undefined, flags: GenerateFlags): Promise<void> {
  if ((prompt === undefined) === (flags.prompts === undefined)) {
    throw Object.assign(new TypeError('give one PROMPT or --prompts FILE (one prompt per line)'), { code: 'KVGPT_OPTION_TYPE' });
  }
  const load: LoadOptions = { device: flags.device, dtype: flags.dtype, maxSequences: flags.maxSequences, maxStepTokens: flags.maxStepTokens, prefillChunk: flags.prefillChunk };
  const prompts = flags.prompts === undefined ? undefined : readPrompts(flags.prompts);
  const model = await Gpt2.load(flags.model, load);
  const controller = new AbortController();
  process.once('SIGINT', () => controller.abort()); // Ctrl-C ends the generation, keeps the output
  const { model: _m, device: _d, dtype: _t, stop, kvCache, json: _j, prompts: _p, maxSequences: _s, maxStepTokens: _k, prefillChunk: _c, ...sampling } = flags;
  // sampling also carries logprobs, which maps one to one.
  const options: GenerateOptions = { ...sampling, stop: stop.length ? stop : undefined, useCache: kvCache, signal: controller.signal };
  if (prompts) return generateMany(model, prompts, options, flags.json === true);
  prompt = prompt as string;
  if (flags.json) {
    const r = await model.generate(prompt, options);
    process.stdout.write(JSON.stringify({ tokens: r.tokens, text: r.text, stopReason: r.stopReason, timings: r.timings, logprobs: r.logprobs }) + '\n');
    return;
  }
  const s = model.stream(prompt, options);
  for await (const chunk of s) process.stdout.write(chunk.text);
  const r = await s.result;
  const t = r.timings;
  process.stdout.write('\n');
  for (const l of r.logprobs ?? []) {
    const alts = l.top.map((a) => `${JSON.stringify(a.text)} ${a.logprob.toFixed(3)}`).join(', ');
    process.stderr.write(`${l.logprob.toFixed(4).padStart(10)}  ${JSON.stringify(l.text)}${alts ? '   ' + alts : ''}\n`);
  }
  process.stderr.write(
    `[${r.stopReason}] ${t.promptTokens} prompt + ${t.generatedTokens} new tokens; load ${t.loadMs.toFixed(0)} ms, ` +
      `prefill ${t.prefillMs.toFixed(1)} ms, ${t.perTokenMs.toFixed(2)} ms/token, ${t.tokensPerSecond.toFixed(1)} tokens/s\n`,
  );
}

/** A file of prompts as one batch: each result in prompt order (JSON lines with --json). */
async function generateMany(model: Gpt2, prompts: string[], options: GenerateOptions, json: boolean): Promise<void> {
  const t0 = performance.now();
  const results = await model.generateBatch(prompts, options);
  const seconds = (performance.now() - t0) / 1000;
  results.forEach((r, i) => {
    if (json) {
      process.stdout.write(JSON.stringify({ prompt: i, tokens: r.tokens, text: r.text, stopReason: r.stopReason, timings: r.timings }) + '\n');
    } else {
      process.stdout.write(`--- ${i} [${r.stopReason}] ${prompts[i]}\n${r.text}\n`);
    }
  });
  const tokens = results.reduce((n, r) => n + r.tokens.length, 0);
  const s = model.engineStats();
  process.stderr.write(
    `${prompts.length} prompts, ${tokens} new tokens in ${seconds.toFixed(2)} s: ${(tokens / seconds).toFixed(1)} tokens/s; ` +
      `${s.steps} forward passes, ${s.meanBatchSize.toFixed(1)} sequences each on average (at most ${s.maxBatch})\n`,
  );
}

function list(name: string) {
  return (v: string): number[] => {
    const xs = v.split(',').map((x) => Number(x.trim()));
    if (!xs.length || xs.some((x) => !Number.isInteger(x))) throw new InvalidArgumentError(`${name} must be integers separated by commas, got ${JSON.stringify(v)}`);
    return xs;
  };
}

interface BenchFlags extends Omit<BenchOptions, 'progress' | 'model' | 'promptTokens'>, EngineFlags {
  model?: string;
  progress: boolean;
  promptTokens?: number;
  concurrency?: number[];
  newTokens: number;
}

async function bench(flags: BenchFlags): Promise<void> {
  if (!Number.isInteger(flags.threads) || flags.threads < 1) throw new RangeError(`--threads must be an integer >= 1, got ${flags.threads}`);
  if (!Number.isInteger(flags.repetitions) || flags.repetitions < 1) throw new RangeError(`--repetitions must be an integer >= 1, got ${flags.repetitions}`);
  if (!['on', 'off', 'both'].includes(flags.cache)) throw new RangeError(`--cache must be on, off or both, got ${flags.cache}`);
  // candle's CPU kernels size their thread pool from this, read when the first model runs.
  process.env.RAYON_NUM_THREADS = String(flags.threads);
  if (flags.concurrency) {
    if (flags.concurrency.some((c) => c < 1)) throw new RangeError(`--concurrency must be integers >= 1, got ${flags.concurrency.join(',')}`);
    if (!Number.isInteger(flags.newTokens) || flags.newTokens < 1) throw new RangeError(`--new-tokens must be an integer >= 1, got ${flags.newTokens}`);
    const log = (l: string) => process.stderr.write(l + '\n');
    const result = await runThroughput({ ...flags, concurrency: flags.concurrency, promptTokens: flags.promptTokens ?? 128 }, log);
    process.stdout.write(formatThroughput(result) + '\n');
    process.stderr.write(`wrote ${(await writeThroughput(result, flags.out, flags.png === true)).join(', ')}\n`);
    return;
  }
  const hf = flags.compare ? readResults(flags.compare) : undefined;
  const options: BenchOptions = { ...flags, promptTokens: flags.promptTokens ?? 5, progress: flags.progress && process.stderr.isTTY === true };
  const result = await runBench(options, (l) => process.stderr.write(l + '\n'));
  process.stdout.write(formatTable(result, hf) + '\n');
  const files = await writeResults(result, options);
  process.stderr.write(`wrote ${files.join(', ')}\n`);
}

export function main(argv: string[]): Promise<void> {
  const program = new Command('kvgpt').description('GPT-2 inference with an in-place KV cache').showHelpAfterError();
  program
    .command('generate')
    .description('generate text from PROMPT, streamed to stdout; or from every line of --prompts FILE, as one batch')
    .argument('[prompt]', 'the prompt text ("" starts from the BOS token)')
    .option('--prompts <file>', "a file with one prompt per line (blank lines skipped; '-' reads standard input), run as one batch")
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
    .option('--logprobs <k>', "each new token's log-probability and the k most likely alternatives (0-20), on stderr or in the JSON", num('--logprobs'))
    .option('--json', 'print one JSON object {tokens, text, stopReason, timings, logprobs} (with --prompts: one line per prompt)')
    .option('--max-sequences <n>', 'sequences the engine runs at once (default 32 on the CPU, 256 on CUDA)', num('--max-sequences'))
    .option('--max-step-tokens <n>', 'tokens one forward pass carries (default 512 on the CPU, 8192 on CUDA)', num('--max-step-tokens'))
    .option('--prefill-chunk <n>', 'prompt tokens one sequence reads per step (default 256 on the CPU, 512 on CUDA)', num('--prefill-chunk'))
    .action(generate);
  const engineFlags = (c: Command) =>
    c
      .option('--max-sequences <n>', 'sequences the engine runs at once', num('--max-sequences'))
      .option('--max-step-tokens <n>', 'tokens one forward pass carries', num('--max-step-tokens'))
      .option('--prefill-chunk <n>', 'prompt tokens one sequence reads per step', num('--prefill-chunk'));
  engineFlags(
    program
      .command('serve')
      .description('an OpenAI-compatible completions server: POST /v1/completions, GET /v1/models, GET /health, GET /metrics')
      .requiredOption('-m, --model <dir|id>', 'model directory or Hugging Face hub id')
      .option('--host <host>', 'address to listen on', '127.0.0.1')
      .option('--port <n>', 'port (0 picks a free one)', num('--port'), 8080)
      .option('--device <device>', "'cpu', 'cuda' or 'auto'", 'cpu')
      .option('--dtype <dtype>', "weights dtype: 'f32', 'f16', 'bf16' or 'q8_0'", 'f32')
      .option('--api-key <key>', 'require Authorization: Bearer KEY (default: $KVGPT_API_KEY, else none)')
      .option('--max-queue <n>', 'sequences that may wait beyond --max-sequences before requests get 429 (default 1024)', num('--max-queue'))
      .option('--shutdown-timeout <s>', 'on SIGINT/SIGTERM, seconds to let running requests finish', num('--shutdown-timeout'), 30),
  ).action(serveCommand);
  engineFlags(
    program
      .command('perplexity')
      .description("the perplexity of a text file (mean NLL and tokens scored), in sliding windows as HF's perplexity guide")
      .argument('<file>', "a UTF-8 text file ('-' reads standard input)")
      .requiredOption('-m, --model <dir|id>', 'model directory or Hugging Face hub id')
      .option('--max-length <n>', "tokens a window holds (default: the model's context)", num('--max-length'))
      .option('--stride <n>', 'tokens between window starts (default: --max-length, windows side by side)', num('--stride'))
      .option('--add-bos', 'put the BOS token first so the first token is scored too')
      .option('--device <device>', "'cpu', 'cuda' or 'auto'", 'cpu')
      .option('--dtype <dtype>', "weights dtype: 'f32', 'f16', 'bf16' or 'q8_0'", 'f32')
      .option('--json', 'print one JSON object {perplexity, nll, tokens, scored, windows, maxLength, stride, seconds, tokensPerSecond}')
      .option('--no-progress', 'no progress bar'),
  ).action(perplexity);
  engineFlags(
    program
      .command('score')
      .description('each token of TEXT with its log-probability given the ones before it')
      .argument('<text>', 'the text to score')
      .requiredOption('-m, --model <dir|id>', 'model directory or Hugging Face hub id')
      .option('--logprobs <k>', 'also show the k most likely tokens at each position (0-20)', num('--logprobs'))
      .option('--add-bos', 'put the BOS token first so the first token is scored too')
      .option('--device <device>', "'cpu', 'cuda' or 'auto'", 'cpu')
      .option('--dtype <dtype>', "weights dtype: 'f32', 'f16', 'bf16' or 'q8_0'", 'f32')
      .option('--json', 'print the whole result as one JSON object'),
  ).action(score);
  program
    .command('bench')
    .description("the KV-cache experiment: greedy generation to total length L, cache on and off, beside the seed article's HF figures; with --concurrency, the batching engine's throughput")
    .option('-m, --model <dir|id>', 'model directory or hub id (default: GPT-2 small shapes with seeded random weights)')
    .option('--lengths <list>', 'total lengths L, comma-separated', list('--lengths'), [10, 110, 310, 510, 710, 910])
    .option('--concurrency <list>', 'throughput mode: concurrent generations, comma-separated (e.g. 1,4,16,64)', list('--concurrency'))
    .option('--new-tokens <n>', 'throughput mode: new tokens per generation', num('--new-tokens'), 128)
    .option('--cache <mode>', 'on, off or both', 'both')
    .option('-r, --repetitions <n>', 'runs per row (the median is reported)', num('--repetitions'), 1)
    .option('--device <device>', "'cpu', 'cuda' or 'auto'", 'cpu')
    .option('--dtype <dtype>', "weights dtype: 'f32', 'f16', 'bf16' or 'q8_0'", 'f32')
    .option('--threads <n>', 'CPU threads for the tensor kernels', num('--threads'), availableParallelism())
    .option('--seed <s>', 'seed of the random weights', num('--seed'), 0)
    .option('--prompt-tokens <n>', 'prompt length (default 5; 128 with --concurrency)', num('--prompt-tokens'))
    .option('--max-sequences <n>', 'throughput mode: engine sequences (default: the largest concurrency)', num('--max-sequences'))
    .option('--max-step-tokens <n>', 'throughput mode: tokens one forward pass carries', num('--max-step-tokens'))
    .option('--prefill-chunk <n>', 'throughput mode: prompt tokens one sequence reads per step', num('--prefill-chunk'))
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
