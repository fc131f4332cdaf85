// The bundled demo model (models/fortunes-gpt2, scripts/fortunes/train.py): the README's first
// command prints text from it, and it equals HF transformers (test/fixtures/fortunes-gpt2,
// made by scripts/fortunes/make_reference.py).
import { describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Gpt2 } from '../src';
import { FIXTURES } from './helpers';

const MODEL = join(__dirname, '..', 'models', 'fortunes-gpt2');
const CLI = join(__dirname, '..', 'dist', 'cli.js');
const ref = JSON.parse(readFileSync(join(FIXTURES, 'fortunes-gpt2', 'reference.json'), 'utf8')) as {
  n_new: number;
  prompts: { prompt: string; input_ids: number[]; greedy_new_ids: number[]; loss: number; perplexity: number }[];
};

describe('the bundled fortunes-gpt2', () => {
  it("the README's first command samples a readable fortune: the text the README shows", async () => {
    const readme = readFileSync(join(__dirname, '..', 'README.md'), 'utf8');
    const first = /```sh\nnpm install && npx (kvgpt generate [^\n]*)\n/.exec(readme)![1];
    expect(first).toBe('kvgpt generate --model models/fortunes-gpt2 --seed 4 "The secret of life is"');
    const shown = /so it prints the same text each time:\n\n```\n([\s\S]*?)```/.exec(readme)![1];
    const run = (seed: string) => spawnSync(process.execPath, [CLI, 'generate', '--model', MODEL, '--seed', seed, 'The secret of life is'], { encoding: 'utf8' });
    const a = run('4');
    expect(a.status, a.stderr).toBe(0);
    expect(a.stdout).toBe(shown);
    expect(a.stderr).toMatch(/^\[eos\] 5 prompt \+ \d+ new tokens/);
    const text = run('7').stdout.trim() + ' ' + a.stdout.trim();
    const words = text.split(/\s+/).filter(Boolean);
    expect(words.length).toBeGreaterThanOrEqual(5);
    // Words of the held-out fortunes (text the model never trained on): most generated words are among them.
    const known = new Set(readFileSync(join(MODEL, 'heldout.txt'), 'utf8').toLowerCase().match(/[a-z']+/g));
    const plain = words.map((w) => w.toLowerCase().replace(/[^a-z']/g, '')).filter(Boolean);
    expect(plain.filter((w) => known.has(w)).length / plain.length).toBeGreaterThan(0.7);
    // And the model finds its own sample likely, where random weights find their text as
    // unlikely as a uniform draw (perplexity near the vocabulary's size).
    using model = await Gpt2.load(MODEL);
    const s = await model.score('The secret of life is' + a.stdout.replace(/\n$/, ''));
    const random = await Gpt2.load(join(FIXTURES, 'tiny-gpt2'));
    const gibberish = await random.generate('The secret of life is', { seed: 4, temperature: 0.6, maxNewTokens: 20 });
    expect((await model.score('The secret of life is' + gibberish.text)).perplexity).toBeGreaterThan(3 * s.perplexity);
    random.dispose();
    expect(s.perplexity).toBeLessThan(60);
  });

  it("q8_0 scores held-out text within 0.1 % of f32's perplexity (its prompts: 8-bit integer products on AVX512-VNNI CPUs)", async () => {
    // 256-token windows: each product has 256 rows, the many-row path (int8 x int8 where the
    // CPU has AVX512-VNNI, f32 otherwise). Measured on the whole file: f32 110.036, q8_0
    // 110.008 with int8 products and 110.008 with f32 ones.
    const text = readFileSync(join(MODEL, 'heldout.txt'), 'utf8').slice(0, 30_000);
    using f32Model = await Gpt2.load(MODEL);
    using q8Model = await Gpt2.load(MODEL, { dtype: 'q8_0' });
    const f32 = (await f32Model.score(text)).perplexity;
    const q8 = (await q8Model.score(text)).perplexity;
    process.env.KVGPT_Q8_PROMPTS = 'f32'; // W widened to f32 for gemm instead, read at each product
    const q8Widened = (await q8Model.score(text)).perplexity;
    delete process.env.KVGPT_Q8_PROMPTS;
    expect(f32).toBeGreaterThan(20);
    expect(Math.abs(q8 - f32) / f32).toBeLessThan(1e-3);
    expect(Math.abs(q8Widened - f32) / f32).toBeLessThan(1e-3);
    // Where the integer path runs, it is the one taken by default: its sums differ from the
    // widened ones (x is rounded to 8 bits too).
    const flags = process.platform === 'linux' ? readFileSync('/proc/cpuinfo', 'utf8') : '';
    if (['avx512f', 'avx512bw', 'avx512_vnni'].every((f) => new RegExp(`\\b${f}\\b`).test(flags))) expect(q8).not.toBe(q8Widened);
    else expect(q8).toBe(q8Widened);
  });

  it("tokenizes, scores and decodes greedily as HF transformers does", async () => {
    using model = await Gpt2.load(MODEL);
    for (const p of ref.prompts) {
      expect(model.tokenize(p.prompt)).toEqual(p.input_ids);
      const g = await model.generate(p.prompt, { temperature: 0, repetitionPenalty: 1, maxNewTokens: ref.n_new, ignoreEos: true });
      expect(g.tokens).toEqual(p.greedy_new_ids);
      const s = await model.score(p.input_ids);
      expect(Math.abs(s.nll - p.loss)).toBeLessThan(1e-4);
    }
  });
});
