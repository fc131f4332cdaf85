import { describe, expect, it, beforeAll, afterAll } from 'vitest';
import { Gpt2, KvgptError } from '../src';
import { reference, TINY, TINY_ZH } from './helpers';

const ref = reference(TINY);
const refZh = reference(TINY_ZH);
let model: Gpt2;
let zh: Gpt2;

beforeAll(async () => {
  model = await Gpt2.load(TINY);
  zh = await Gpt2.load(TINY_ZH);
});
afterAll(() => {
  model.dispose();
  zh.dispose();
});

const greedy = { maxNewTokens: 40, ignoreEos: true } as const;

describe('greedy generation matches HF transformers', () => {
  it.each(ref.prompts.map((p, i) => [i, p] as const))('tiny-gpt2 prompt %i, cache on and off', async (_, p) => {
    const newText = p.greedy_text.slice(p.prompt.length);
    for (const useCache of [true, false]) {
      const r = await model.generate(p.input_ids, { ...greedy, useCache });
      expect(r.tokens).toEqual(p.greedy_new_ids);
      expect(r.stopReason).toBe('max_new_tokens');
      expect(r.text).toBe(newText);
    }
    // The same prompt as text tokenizes to the reference ids.
    expect(model.tokenize(p.prompt)).toEqual(p.input_ids);
  });

  it.each(refZh.prompts.map((p, i) => [i, p] as const))('tiny-gpt2-zh (pytorch_model.bin + vocab.txt) prompt %i', async (_, p) => {
    const r = await zh.generate(p.prompt, { maxNewTokens: refZh.n_new, ignoreEos: true });
    expect(r.promptTokens).toEqual(p.input_ids);
    expect(r.tokens).toEqual(p.greedy_new_ids);
    expect(zh.decode([...p.input_ids, ...r.tokens])).toBe(p.greedy_text);
  });
});

describe('stream', () => {
  it('yields every token as generate returns it, and the chunks add up to the text', async () => {
    const p = ref.prompts[1];
    const s = model.stream(p.prompt, greedy);
    const chunks = [];
    for await (const c of s) chunks.push(c);
    const r = await s.result;
    expect(chunks.map((c) => c.token)).toEqual(p.greedy_new_ids);
    expect(chunks.map((c) => c.text).join('')).toBe(r.text);
    expect(r.text).toBe(p.greedy_text.slice(p.prompt.length));
  });

  it.each(ref.prompts.map((p, i) => [i, p] as const))('streamed chunks equal HF decoding all at once, prompt %i', async (_, p) => {
    // The outputs contain tokens that are parts of multi-byte characters (and, from random
    // weights, invalid bytes that HF decodes as U+FFFD): streaming must reproduce them exactly.
    const s = model.stream(p.input_ids, greedy);
    const texts: string[] = [];
    for await (const c of s) texts.push(c.text);
    expect(texts.join('')).toBe(p.greedy_text.slice(p.prompt.length));
  });

  it('stops the native generation when the consumer breaks out', async () => {
    const s = model.stream(ref.prompts[0].input_ids, { maxNewTokens: 100, ignoreEos: true, useCache: false });
    let n = 0;
    for await (const _ of s) if (++n === 3) break;
    const r = await s.result;
    expect(r.stopReason).toBe('aborted');
    expect(r.tokens.length).toBeLessThan(100);
    expect(r.tokens).toEqual(ref.prompts[0].greedy_new_ids.slice(0, r.tokens.length));
  });
});

describe('sampling', () => {
  const opts = { maxNewTokens: 40, ignoreEos: true, temperature: 0.9, topK: 40, topP: 0.95, seed: 1234 };
  it('repeats with a seed, cache on or off', async () => {
    const a = await model.generate(ref.prompts[0].input_ids, opts);
    const b = await model.generate(ref.prompts[0].input_ids, opts);
    const c = await model.generate(ref.prompts[0].input_ids, { ...opts, useCache: false });
    const d = await model.generate(ref.prompts[0].input_ids, { ...opts, seed: 4321 });
    expect(b.tokens).toEqual(a.tokens);
    expect(c.tokens).toEqual(a.tokens);
    expect(d.tokens).not.toEqual(a.tokens);
    expect(a.tokens).not.toEqual(ref.prompts[0].greedy_new_ids);
  });

  it('repetition penalty changes greedy output and keeps it deterministic', async () => {
    const a = await model.generate(ref.prompts[4].input_ids, { ...greedy, repetitionPenalty: 1.5 });
    const b = await model.generate(ref.prompts[4].input_ids, { ...greedy, repetitionPenalty: 1.5 });
    expect(a.tokens).toEqual(b.tokens);
    expect(a.tokens).not.toEqual(ref.prompts[4].greedy_new_ids);
    // Prompt 4 greedy repeats " blasting" many times; the penalty must reduce repeats.
    const repeats = (ids: number[]) => ids.length - new Set(ids).size;
    expect(repeats(a.tokens)).toBeLessThan(repeats(ref.prompts[4].greedy_new_ids));
  });
});

describe('stops', () => {
  it('ends the text before a stop string', async () => {
    const p = ref.prompts[0];
    const full = p.greedy_text.slice(p.prompt.length);
    const r = await model.generate(p.input_ids, { ...greedy, stop: [' Gould', 'zzz'] });
    expect(r.stopReason).toBe('stop_string');
    expect(r.text).toBe(full.slice(0, full.indexOf(' Gould')));
    expect(r.tokens).toEqual(p.greedy_new_ids.slice(0, r.tokens.length));
  });

  it('stops at maxNewTokens and at the context', async () => {
    const r0 = await model.generate('Hi', { maxNewTokens: 0 });
    expect(r0).toMatchObject({ tokens: [], text: '', stopReason: 'max_new_tokens' });
    const long = Array.from({ length: 125 }, (_, i) => 100 + i);
    const r = await model.generate(long, { maxNewTokens: 50, ignoreEos: true });
    expect(r.stopReason).toBe('context_full');
    expect(r.promptTokens.length + r.tokens.length).toBe(model.info.nPositions + 1);
  });

  it('an empty prompt starts from BOS', async () => {
    const r = await model.generate('', { maxNewTokens: 5, ignoreEos: true });
    expect(r.promptTokens).toEqual([50256]);
    expect(r.tokens).toEqual(ref.prompts[4].greedy_new_ids.slice(0, 5));
  });
});

describe('abort', () => {
  it('stops a running generation within one step and keeps the partial result', async () => {
    const controller = new AbortController();
    const s = model.stream(ref.prompts[0].input_ids, { maxNewTokens: 120, ignoreEos: true, useCache: false, signal: controller.signal });
    let n = 0;
    for await (const _ of s) if (++n === 5) controller.abort();
    const r = await s.result;
    expect(r.stopReason).toBe('aborted');
    expect(r.tokens.length).toBeGreaterThanOrEqual(5);
    expect(r.tokens.length).toBeLessThan(120);
    expect(r.tokens.slice(0, 40)).toEqual(ref.prompts[0].greedy_new_ids.slice(0, Math.min(40, r.tokens.length)));
  });

  it('an already aborted signal generates nothing', async () => {
    const r = await model.generate('Hello', { maxNewTokens: 10, signal: AbortSignal.abort() });
    expect(r).toMatchObject({ tokens: [], stopReason: 'aborted' });
  });
});

describe('concurrency and the JS thread', () => {
  it('two generations at once give the same results as one after the other', async () => {
    const a = ref.prompts[0].input_ids;
    const b = ref.prompts[2].input_ids;
    const sampled = { maxNewTokens: 40, ignoreEos: true, temperature: 1, seed: 7 };
    const [ra, rb] = await Promise.all([model.generate(a, greedy), model.generate(b, sampled)]);
    expect(ra.tokens).toEqual(ref.prompts[0].greedy_new_ids);
    expect(rb.tokens).toEqual((await model.generate(b, sampled)).tokens);
  });

  it('the event loop keeps running during a generation', async () => {
    let ticks = 0;
    const timer = setInterval(() => ticks++, 1);
    const r = await model.generate(ref.prompts[0].input_ids, { maxNewTokens: 100, ignoreEos: true, useCache: false });
    clearInterval(timer);
    expect(r.tokens.length).toBe(100);
    expect(ticks).toBeGreaterThan(3);
  });
});

describe('options are validated before any work', () => {
  const cases: [object, RegExp][] = [
    [{ temperature: -1 }, /temperature must be in \[0, 100\]/],
    [{ topP: 0 }, /topP must be in \(0, 1\]/],
    [{ topP: 1.5 }, /topP must be in \(0, 1\]/],
    [{ maxNewTokens: -1 }, /maxNewTokens must be an integer in \[0, 1048576\]/],
    [{ maxNewTokens: 2.5 }, /maxNewTokens must be an integer/],
    [{ topK: -3 }, /topK must be an integer/],
    [{ repetitionPenalty: 0 }, /repetitionPenalty must be in \(0, 100\]/],
    [{ seed: -1 }, /seed must be an integer/],
    [{ stop: [''] }, /stop strings must be non-empty/],
  ];
  it.each(cases)('%o is a RangeError', async (opts, message) => {
    const err = await model.generate('Hello', opts).catch((e) => e);
    expect(err).toBeInstanceOf(RangeError);
    expect(err.code).toBe('KVGPT_OPTION_RANGE');
    expect(err.message).toMatch(message);
  });

  it('wrong types and unknown keys are TypeErrors', async () => {
    for (const opts of [{ temperature: '0.5' }, { ignoreEos: 1 }, { stop: 5 }, { maxTokens: 5 }, { signal: {} }]) {
      const err = await model.generate('Hello', opts as never).catch((e) => e);
      expect(err).toBeInstanceOf(TypeError);
      expect(err.code).toBe('KVGPT_OPTION_TYPE');
    }
    const unknown = await model.generate('Hello', { maxTokens: 5 } as never).catch((e) => e);
    expect(unknown.message).toMatch(/unknown option "maxTokens"; known options: maxNewTokens, temperature/);
    const prompt = await model.generate(42 as never).catch((e) => e);
    expect(prompt).toBeInstanceOf(TypeError);
  });

  it('an unknown device is a RangeError; cuda on this build is a device error', async () => {
    const err = await Gpt2.load(TINY, { device: 'tpu' as never }).catch((e) => e);
    expect(err).toBeInstanceOf(RangeError);
    expect(err.message).toMatch(/'cpu', 'cuda' or 'auto'/);
    const cuda = await Gpt2.load(TINY, { device: 'cuda' }).catch((e) => e);
    expect(cuda).toBeInstanceOf(KvgptError);
    expect(cuda.code).toBe('KVGPT_DEVICE');
  });

  it('bad prompts are typed errors', async () => {
    const outside = await model.generate([1, 50257]).catch((e) => e);
    expect(outside).toMatchObject({ code: 'KVGPT_INVALID_INPUT' });
    expect(outside.message).toMatch(/token id 50257 at index 1 is outside the vocabulary/);
    const tooLong = await model.generate(Array(129).fill(1)).catch((e) => e);
    expect(tooLong.message).toMatch(/prompt is 129 tokens but the model's context is 128/);
    const fractional = await model.generate([1.5]).catch((e) => e);
    expect(fractional).toMatchObject({ code: 'KVGPT_INVALID_INPUT' });
  });

  it('checkPrompt finds on this thread what generate() would reject, and runs nothing', async () => {
    const steps = model.engineStats().steps;
    expect(model.checkPrompt('Hello world', { temperature: 0.5 })).toEqual(model.tokenize('Hello world'));
    expect(model.checkPrompt('')).toEqual([50256]); // [bos], as generate() sees it
    const cases: [() => unknown, unknown][] = [
      [() => model.generate([1, 50257]), () => model.checkPrompt([1, 50257])],
      [() => model.generate(Array(129).fill(1)), () => model.checkPrompt(Array(129).fill(1))],
      [() => model.generate('Hello', { topP: 2 }), () => model.checkPrompt('Hello', { topP: 2 })],
      [() => model.generate('Hello', { maxTokens: 1 } as never), () => model.checkPrompt('Hello', { maxTokens: 1 } as never)],
    ] as never;
    for (const [gen, check] of cases as [() => Promise<unknown>, () => unknown][]) {
      const want = await gen().catch((e) => e);
      let got: unknown;
      try {
        check();
      } catch (e) {
        got = e;
      }
      expect(got).toBeInstanceOf(Error);
      expect(got).toEqual(want);
      expect((got as { code: string }).code).toBe((want as { code: string }).code);
    }
    expect(model.engineStats().steps).toBe(steps);
  });
});

describe('model info, tokenizer and lifecycle', () => {
  it('reports the config, parameters and the KV-cache formula', () => {
    const info = model.info;
    expect(info).toMatchObject({ nLayer: 2, nHead: 4, nEmbd: 32, nPositions: 128, vocabSize: 50257, device: 'cpu', dtype: 'f32' });
    expect(info.cacheBytesPerToken).toBe(2 * 2 * 32 * 4);
    expect(model.cacheBytes(1024)).toBe(2 * 2 * 32 * 1024 * 4);
    // wte 50257x32 + wpe 128x32 + 2 blocks + ln_f, as HF's num_parameters().
    const block = 2 * 2 * 32 + 32 * 96 + 96 + 32 * 32 + 32 + 32 * 128 + 128 + 128 * 32 + 32;
    expect(info.parameterCount).toBe(50257 * 32 + 128 * 32 + 2 * block + 2 * 32);
    // A decode step reads every weight but wpe's other rows; wte is the tied lm_head.
    expect(info.stepWeightBytes).toBe(4 * (info.parameterCount - 128 * 32));
  });

  it('reports the cache bytes of a generation', async () => {
    const r = await model.generate([1, 2, 3], { maxNewTokens: 10, ignoreEos: true });
    expect(r.cacheBytes).toBe(model.cacheBytes(13));
    const off = await model.generate([1, 2, 3], { maxNewTokens: 10, ignoreEos: true, useCache: false });
    expect(off.cacheBytes).toBe(0);
    expect(r.timings.generatedTokens).toBe(10);
    expect(r.timings.stepMs.length).toBe(9);
    expect(r.timings.perTokenMs).toBeGreaterThan(0);
    expect(r.timings.tokensPerSecond).toBeGreaterThan(0);
  });

  it('any call after dispose is a typed error', async () => {
    const m = await Gpt2.load(TINY);
    m[Symbol.dispose]();
    expect(m.disposed).toBe(true);
    const calls = [() => m.tokenize('x'), () => m.decode([1]), () => m.info, () => m.cacheBytes(1)];
    for (const call of calls) expect(call).toThrow(expect.objectContaining({ code: 'KVGPT_DISPOSED' }));
    await expect(m.generate('x')).rejects.toMatchObject({ code: 'KVGPT_DISPOSED' });
  });

  it('a generation running when dispose is called still finishes', async () => {
    const m = await Gpt2.load(TINY);
    const running = m.generate(ref.prompts[0].input_ids, greedy);
    m.dispose();
    expect((await running).tokens).toEqual(ref.prompts[0].greedy_new_ids);
  });
});
