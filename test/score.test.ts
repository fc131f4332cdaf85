import { describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Gpt2 } from '../src';
import { FIXTURES, reference, TINY, TINY_ZH } from './helpers';

interface Sliding {
  input_ids: number[];
  cases: { max_length: number; stride: number; windows: number; scored: number; nll: number; perplexity: number; positions: number[]; logprobs: number[] }[];
}
const sliding: Sliding = JSON.parse(readFileSync(join(FIXTURES, 'sliding', 'reference.json'), 'utf8'));
const slidingText = readFileSync(join(FIXTURES, 'sliding', 'text.txt'), 'utf8');
const refs = (dir: string) => reference(dir).prompts as unknown as { prompt: string; input_ids: number[]; loss: number; perplexity: number }[];

describe('model.score', () => {
  it("equals HF's loss and perplexity (labels = input_ids) for every reference prompt of both fixtures", async () => {
    for (const dir of [TINY, TINY_ZH]) {
      using model = await Gpt2.load(dir);
      for (const p of refs(dir)) {
        if (p.input_ids.length < 2) continue;
        const r = await model.score(p.input_ids);
        expect(Math.abs(r.nll - p.loss)).toBeLessThan(1e-4);
        expect(Math.abs(r.perplexity - p.perplexity) / p.perplexity).toBeLessThan(1e-4);
        expect(r.scored).toBe(p.input_ids.length - 1);
        expect(r.tokens.map((t) => t.position)).toEqual(p.input_ids.slice(1).map((_, i) => i + 1));
        expect(r.tokens.map((t) => t.token)).toEqual(p.input_ids.slice(1));
      }
    }
  });

  it("sliding windows equal HF's perplexity-guide loop, token by token, at three (maxLength, stride)", async () => {
    using model = await Gpt2.load(TINY);
    for (const c of sliding.cases) {
      const r = await model.score(slidingText, { maxLength: c.max_length, stride: c.stride });
      expect(r.ids).toEqual(sliding.input_ids);
      expect(Math.abs(r.nll - c.nll) / c.nll).toBeLessThan(1e-4);
      expect(r.windows).toBe(c.windows);
      expect(r.tokens.map((t) => t.position)).toEqual(c.positions);
      const worst = Math.max(...r.tokens.map((t, i) => Math.abs(t.logprob - c.logprobs[i])));
      expect(worst).toBeLessThan(1e-4);
      expect(r.ids.length).toBeGreaterThan(4 * 128); // several contexts long
    }
  });

  it('gives each token its text and the k most likely alternatives, most likely first', async () => {
    using model = await Gpt2.load(TINY);
    const text = 'Hello, my dog is cute é';
    const r = await model.score(text, { logprobs: 4, addBos: true });
    expect(r.ids[0]).toBe(50256);
    expect(r.tokens[0].position).toBe(1); // the text's first token, after BOS
    expect(r.tokens.map((t) => t.text).join('')).toBe(text);
    for (const t of r.tokens) {
      expect(t.top).toHaveLength(4);
      expect(t.top.map((a) => a.logprob)).toEqual([...t.top.map((a) => a.logprob)].sort((a, b) => b - a));
      expect(t.logprob).toBeLessThanOrEqual(t.top[0].logprob);
      expect(t.top[0].text).toBe(model.decode([t.top[0].token]));
      // A token in the top k carries its own log-probability there.
      const self = t.top.find((a) => a.token === t.token);
      if (self) expect(self.logprob).toBe(t.logprob);
    }
    expect(r.timings.forwardTokens).toBe(r.ids.length);
    expect(r.timings.tokensPerSecond).toBeGreaterThan(0);
  });

  it('reports progress up to the total, and scoreBatch equals one-by-one scoring', async () => {
    using model = await Gpt2.load(TINY, { prefillChunk: 32 });
    const seen: [number, number][] = [];
    const one = await model.score(slidingText, { maxLength: 100, stride: 37, onProgress: (s, t) => seen.push([s, t]) });
    await new Promise((r) => setTimeout(r, 20)); // progress events travel apart from the result
    expect(seen.length).toBeGreaterThan(5);
    expect(seen.at(-1)).toEqual([one.scored, one.scored]);
    expect(seen.every(([s], i) => i === 0 || s > seen[i - 1][0])).toBe(true);
    const texts = [slidingText, 'Hello, my dog is cute', slidingText.slice(0, 300)];
    const batch = await model.scoreBatch(texts, { maxLength: 100, stride: 37 });
    for (const [i, t] of texts.entries()) {
      const solo = await model.score(t, { maxLength: 100, stride: 37 });
      expect(batch[i].tokens.map((x) => x.logprob)).toEqual(solo.tokens.map((x) => x.logprob));
      expect(batch[i].nll).toBe(solo.nll);
    }
    expect(model.engineStats().maxBatch).toBeGreaterThanOrEqual(3);
  });

  it('bad input is a typed error: empty text, bad ranges, unknown options, abort', async () => {
    using model = await Gpt2.load(TINY);
    await expect(model.score('')).rejects.toMatchObject({ code: 'KVGPT_INVALID_INPUT', message: expect.stringContaining('nothing to score: the text is empty') });
    await expect(model.score([464])).rejects.toMatchObject({ code: 'KVGPT_INVALID_INPUT' });
    await expect(model.score('a b', { stride: 0 })).rejects.toMatchObject({ name: 'RangeError', code: 'KVGPT_OPTION_RANGE' });
    await expect(model.score('a b', { maxLength: 64, stride: 65 })).rejects.toThrow(/stride must be an integer in \[1, maxLength = 64\]/);
    await expect(model.score('a b', { maxLength: 129 })).rejects.toThrow(/maxLength must be an integer in \[2, 128\]/);
    await expect(model.score('a b', { logprobs: 21 })).rejects.toMatchObject({ code: 'KVGPT_OPTION_RANGE' });
    await expect(model.score('a b', { stride: 1.5 })).rejects.toMatchObject({ code: 'KVGPT_OPTION_RANGE' });
    await expect(model.score('a b', { strides: 4 } as never)).rejects.toMatchObject({ name: 'TypeError', code: 'KVGPT_OPTION_TYPE' });
    await expect(model.score(42 as never)).rejects.toMatchObject({ code: 'KVGPT_OPTION_TYPE' });
    await expect(model.score([1, 99999])).rejects.toMatchObject({ code: 'KVGPT_INVALID_INPUT' });
    const aborted = new AbortController();
    aborted.abort();
    await expect(model.score(slidingText, { signal: aborted.signal })).rejects.toMatchObject({ code: 'KVGPT_ABORTED' });
    // Mid-way: a long text with many windows, aborted after its first progress event.
    const c = new AbortController();
    await expect(model.score(slidingText, { maxLength: 16, stride: 1, signal: c.signal, onProgress: () => c.abort() })).rejects.toMatchObject({ code: 'KVGPT_ABORTED' });
    await expect(model.scoreBatch(['a b c', '', 'd e'])).rejects.toThrow(/^text 1: nothing to score/);
    // The model still works.
    expect((await model.score('a b c')).scored).toBe(2);
  });
});

describe('generate with logprobs', () => {
  it("gives each new token its log-probability before sampling's processing, in the result and the stream", async () => {
    using model = await Gpt2.load(TINY);
    const p = reference(TINY).prompts[0];
    const opts = { maxNewTokens: 12, ignoreEos: true, temperature: 1.5, topK: 40, repetitionPenalty: 1.2, seed: 3, logprobs: 3 };
    const r = await model.generate(p.prompt, opts);
    expect(r.logprobs).toHaveLength(r.tokens.length);
    // The same numbers as scoring the prompt and the generated tokens.
    const s = await model.score([...p.input_ids, ...r.tokens], { logprobs: 3 });
    r.logprobs!.forEach((l, i) => {
      const t = s.tokens[p.input_ids.length - 1 + i];
      expect(l.token).toBe(r.tokens[i]);
      expect(Math.abs(l.logprob - t.logprob)).toBeLessThan(1e-4);
      expect(l.top.map((a) => a.token)).toEqual(t.top.map((a) => a.token));
      expect(l.text).toBe(model.decode([l.token]));
    });
    const chunks = [];
    for await (const c of model.stream(p.prompt, opts)) chunks.push(c);
    expect(chunks.map((c) => c.logprob)).toEqual(r.logprobs);
    // Greedy: the token is the most likely one.
    const g = await model.generate(p.prompt, { maxNewTokens: 5, logprobs: 1 });
    g.logprobs!.forEach((l, i) => expect(l.top[0]).toEqual({ token: g.tokens[i], text: l.text, logprob: l.logprob }));
    expect((await model.generate(p.prompt, { maxNewTokens: 2 })).logprobs).toBeUndefined();
    await expect(model.generate('x', { logprobs: 21 })).rejects.toMatchObject({ code: 'KVGPT_OPTION_RANGE' });
    await expect(model.generate('x', { logprobs: '2' as never })).rejects.toMatchObject({ code: 'KVGPT_OPTION_TYPE' });
  });
});
