#!/usr/bin/env node
// The kvgpt command line: `kvgpt generate` streams text to stdout (or prints one JSON object
// with --json). Option ranges are checked by the library, which says what is allowed.

import { Command, InvalidArgumentError } from 'commander';
import { Gpt2, type Device } from './model';
import type { GenerateOptions } from './generate';
import { KvgptError } from './errors';

function num(name: string) {
  return (v: string): number => {
    const n = Number(v);
    if (v.trim() === '' || !Number.isFinite(n)) throw new InvalidArgumentError(`${name} must be a number, got ${JSON.stringify(v)}`);
    return n;
  };
}
const collect = (v: string, prev: string[]) => [...prev, v];

interface GenerateFlags {
  model: string;
  device: Device;
  maxNewTokens?: number;
  temperature?: number;
  topK?: number;
  topP?: number;
  repetitionPenalty?: number;
  seed?: number;
  stop: string[];
  ignoreEos?: boolean;
  kvCache: boolean;
  json?: boolean;
}

async function generate(prompt: string, flags: GenerateFlags): Promise<void> {
  const model = await Gpt2.load(flags.model, { device: flags.device });
  const controller = new AbortController();
  process.once('SIGINT', () => controller.abort()); // Ctrl-C ends the generation, keeps the output
  const options: GenerateOptions = {
    maxNewTokens: flags.maxNewTokens,
    temperature: flags.temperature,
    topK: flags.topK,
    topP: flags.topP,
    repetitionPenalty: flags.repetitionPenalty,
    seed: flags.seed,
    stop: flags.stop.length ? flags.stop : undefined,
    ignoreEos: flags.ignoreEos,
    useCache: flags.kvCache,
    signal: controller.signal,
  };
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

export function main(argv: string[]): Promise<void> {
  const program = new Command('kvgpt').description('GPT-2 inference with an in-place KV cache').showHelpAfterError();
  program
    .command('generate')
    .description('generate text from PROMPT, streamed to stdout')
    .argument('<prompt>', 'the prompt text ("" starts from the BOS token)')
    .requiredOption('-m, --model <dir|id>', 'model directory or Hugging Face hub id')
    .option('--device <device>', "'cpu', 'cuda' or 'auto'", 'cpu')
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
