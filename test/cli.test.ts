import { describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { reference, TINY } from './helpers';

const CLI = join(__dirname, '..', 'dist', 'cli.js');
const ref = reference(TINY);

function kvgpt(...args: string[]) {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8' });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('kvgpt generate', () => {
  it('--json prints the 40 reference ids (the README parity command)', () => {
    const r = kvgpt('generate', '--model', TINY, '--max-new-tokens', '40', '--ignore-eos', '--json', 'Hello, my dog is cute');
    expect(r.code).toBe(0);
    const out = JSON.parse(r.stdout);
    expect(out.tokens).toEqual(ref.prompts[0].greedy_new_ids);
    expect(out.text).toBe(ref.prompts[0].greedy_text.slice(ref.prompts[0].prompt.length));
    expect(out.stopReason).toBe('max_new_tokens');
    expect(out.timings.generatedTokens).toBe(40);
  });

  it('streams the text to stdout, and --no-kv-cache gives the same text', () => {
    const p = ref.prompts[1];
    const expected = p.greedy_text.slice(p.prompt.length) + '\n';
    const on = kvgpt('generate', '-m', TINY, '-n', '40', '--ignore-eos', p.prompt);
    const off = kvgpt('generate', '-m', TINY, '-n', '40', '--ignore-eos', '--no-kv-cache', p.prompt);
    expect(on.stdout).toBe(expected);
    expect(off.stdout).toBe(expected);
    expect(on.stderr).toMatch(/\[max_new_tokens\] 8 prompt \+ 40 new tokens/);
  });

  it('--stop, --seed and sampling flags reach the generator', () => {
    const p = ref.prompts[0];
    const r = kvgpt('generate', '-m', TINY, '-n', '40', '--ignore-eos', '--stop', ' Gould', '--json', p.prompt);
    const out = JSON.parse(r.stdout);
    expect(out.stopReason).toBe('stop_string');
    expect(out.text).toBe(' guides meg obedient obedient 157 prof Objective tips Downloads');
    const args = ['generate', '-m', TINY, '-n', '20', '--ignore-eos', '--temperature', '0.8', '--top-k', '20', '--top-p', '0.9', '--seed', '5', '--json', p.prompt];
    expect(JSON.parse(kvgpt(...args).stdout).tokens).toEqual(JSON.parse(kvgpt(...args).stdout).tokens);
  });

  it('bad options exit 2 with the allowed range; a missing model exits 1 naming the file', () => {
    const r = kvgpt('generate', '-m', TINY, '--top-p', '2', 'x');
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/topP must be in \(0, 1\]/);
    const nan = kvgpt('generate', '-m', TINY, '--temperature', 'hot', 'x');
    expect(nan.code).not.toBe(0);
    expect(nan.stderr).toMatch(/--temperature must be a number/);
    const missing = kvgpt('generate', '-m', join(TINY, '..', 'gpt2-tokenizer'), 'x');
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/config.json not found: .*gpt2-tokenizer.*KVGPT_FILE_NOT_FOUND/);
  });

  it('--prompts runs a file (or standard input) as one batch: JSON lines in prompt order', () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvgpt-prompts-'));
    const file = join(dir, 'prompts.txt');
    const oneLine = ref.prompts.filter((p) => !p.prompt.includes('\n')); // a line is a prompt
    writeFileSync(file, oneLine.map((p) => p.prompt).join('\n') + '\n\n');
    const r = kvgpt('generate', '-m', TINY, '-n', '40', '--ignore-eos', '--json', '--prompts', file);
    expect(r.code, r.stderr).toBe(0);
    const lines = r.stdout.trim().split('\n').map((l) => JSON.parse(l));
    expect(lines.map((l) => l.prompt)).toEqual([0, 1, 2, 3]);
    expect(lines.map((l) => l.tokens)).toEqual(oneLine.map((p) => p.greedy_new_ids));
    expect(r.stderr).toMatch(/4 prompts, 160 new tokens in [\d.]+ s: [\d.]+ tokens\/s; \d+ forward passes, [\d.]+ sequences each on average \(at most 4\)/);
    const piped = spawnSync(process.execPath, [CLI, 'generate', '-m', TINY, '-n', '3', '--ignore-eos', '--max-sequences', '2', '--prompts', '-'], { input: `${ref.prompts[0].prompt}\r\n${ref.prompts[1].prompt}\n`, encoding: 'utf8' });
    expect(piped.status, piped.stderr).toBe(0);
    expect(piped.stdout).toBe(ref.prompts.slice(0, 2).map((p, i) => `--- ${i} [max_new_tokens] ${p.prompt}\n${p.greedy_text.slice(p.prompt.length).split(' ').slice(0, 4).join(' ')}\n`).join(''));
    expect(kvgpt('generate', '-m', TINY, '--prompts', join(dir, 'nope.txt'))).toMatchObject({ code: 1, stderr: expect.stringMatching(/cannot read the prompts file .*nope\.txt/) });
    expect(kvgpt('generate', '-m', TINY, '--prompts', file, 'also a prompt').code).toBe(2);
    expect(kvgpt('generate', '-m', TINY).stderr).toMatch(/give one PROMPT or --prompts FILE/);
    rmSync(dir, { recursive: true, force: true });
  });
});

describe('kvgpt perplexity and kvgpt score', () => {
  const SLIDING = join(__dirname, 'fixtures', 'sliding');
  const sliding = JSON.parse(readFileSync(join(SLIDING, 'reference.json'), 'utf8'));
  const text = join(SLIDING, 'text.txt');

  it("--json prints HF's perplexity-guide figures for a file, at the default and a given stride", () => {
    for (const c of sliding.cases.filter((c: { max_length: number }) => c.max_length === 128)) {
      const r = kvgpt('perplexity', '-m', TINY, '--stride', String(c.stride), '--json', text);
      expect(r.code, r.stderr).toBe(0);
      const out = JSON.parse(r.stdout);
      expect(Math.abs(out.nll - c.nll) / c.nll).toBeLessThan(1e-4);
      expect(Math.abs(out.perplexity - c.perplexity) / c.perplexity).toBeLessThan(1e-3);
      expect(out).toMatchObject({ tokens: sliding.input_ids.length, scored: c.scored, windows: c.windows, maxLength: 128, stride: c.stride });
    }
    const plain = kvgpt('perplexity', '-m', TINY, text);
    const printed = /^perplexity ([\d.]+)\n$/.exec(plain.stdout);
    expect(Math.abs(Number(printed![1]) - sliding.cases[0].perplexity) / sliding.cases[0].perplexity).toBeLessThan(1e-3);
    expect(plain.stderr).toMatch(/mean NLL [\d.]+ nats over 546 scored tokens; 551 tokens in 5 window\(s\) of 128, stride 128; [\d.]+ s, [\d.]+ tokens\/s/);
  });

  it("'-' reads standard input; unreadable, non-UTF-8 and empty input and bad ranges are named errors", () => {
    const p = ref.prompts[0] as unknown as { prompt: string; loss: number };
    const piped = spawnSync(process.execPath, [CLI, 'perplexity', '-m', TINY, '--json', '-'], { input: p.prompt, encoding: 'utf8' });
    expect(piped.status, piped.stderr).toBe(0);
    expect(Math.abs(JSON.parse(piped.stdout).nll - p.loss)).toBeLessThan(1e-4);
    const dir = mkdtempSync(join(tmpdir(), 'kvgpt-ppl-'));
    writeFileSync(join(dir, 'latin1.txt'), Buffer.from([0x63, 0x61, 0x66, 0xe9, 0x0a]));
    writeFileSync(join(dir, 'empty.txt'), '');
    expect(kvgpt('perplexity', '-m', TINY, join(dir, 'latin1.txt'))).toMatchObject({ code: 1, stderr: expect.stringMatching(/latin1\.txt is not UTF-8 text .*KVGPT_INVALID_FILE/) });
    expect(kvgpt('perplexity', '-m', TINY, join(dir, 'nope.txt'))).toMatchObject({ code: 1, stderr: expect.stringMatching(/cannot read .*nope\.txt: no such file .*KVGPT_FILE_NOT_FOUND/) });
    expect(kvgpt('perplexity', '-m', TINY, dir)).toMatchObject({ code: 1, stderr: expect.stringMatching(/it is a directory/) });
    expect(kvgpt('perplexity', '-m', TINY, join(dir, 'empty.txt'))).toMatchObject({ code: 1, stderr: expect.stringMatching(/nothing to score: the text is empty.*KVGPT_INVALID_INPUT/) });
    expect(kvgpt('perplexity', '-m', TINY, '--stride', '0', text)).toMatchObject({ code: 2, stderr: expect.stringMatching(/stride must be an integer in \[1, maxLength = 128\]/) });
    expect(kvgpt('perplexity', '-m', TINY, '--max-length', '4096', text)).toMatchObject({ code: 2, stderr: expect.stringMatching(/maxLength must be an integer in \[2, 128\]/) });
    rmSync(dir, { recursive: true, force: true });
  });

  it('score shows each token with its log-probability; --json gives the whole result', () => {
    const p = ref.prompts[0] as unknown as { prompt: string; input_ids: number[]; loss: number };
    const r = kvgpt('score', '-m', TINY, '--logprobs', '2', '--json', p.prompt);
    expect(r.code, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout);
    expect(out.ids).toEqual(p.input_ids);
    expect(Math.abs(out.nll - p.loss)).toBeLessThan(1e-4);
    expect(out.tokens).toHaveLength(p.input_ids.length - 1);
    expect(out.tokens[0]).toMatchObject({ position: 1, token: p.input_ids[1], top: [expect.any(Object), expect.any(Object)] });
    const plain = kvgpt('score', '-m', TINY, p.prompt);
    const lines = plain.stdout.trim().split('\n');
    expect(lines[0]).toBe('"Hello"  (context)');
    expect(lines.slice(1).map((l) => l.trim().split(/\s+/)[1])).toEqual(p.input_ids.slice(1).map(String));
    expect(plain.stderr).toMatch(/perplexity [\d.]+, mean NLL [\d.]+ nats over 5 tokens/);
  });

  it('generate --logprobs adds them to --json and lists them on stderr', () => {
    const r = kvgpt('generate', '-m', TINY, '-n', '4', '--ignore-eos', '--logprobs', '2', '--json', 'Hello');
    const out = JSON.parse(r.stdout);
    expect(out.logprobs).toHaveLength(4);
    expect(out.logprobs.map((l: { token: number }) => l.token)).toEqual(out.tokens);
    const plain = kvgpt('generate', '-m', TINY, '-n', '4', '--ignore-eos', '--logprobs', '1', 'Hello');
    expect(plain.stderr.split('\n').filter((l) => /^\s+-[\d.]+ {2}"/.test(l))).toHaveLength(4);
  });
});
