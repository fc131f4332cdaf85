// Bad input through the JS API: text with lone surrogates and NUL bytes, every option at and
// past its bounds, and the lifecycle cases (abort before start, during prefill, after the end;
// dispose while generating). Each row of the README's "Bad input and faults" table that is
// about the JS API points here or at generate.test.ts.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Gpt2, KvgptError } from '../src';
import { reference, TINY } from './helpers';

const ref = reference(TINY);
const greedy = { maxNewTokens: 40, ignoreEos: true } as const;
let model: Gpt2;

beforeAll(async () => {
  model = await Gpt2.load(TINY);
});
afterAll(() => model.dispose());

/** What napi's string conversion (V8's String::WriteUtf8) does to lone surrogates. */
const wellFormed = (s: string) => s.replace(/[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/g, '\uFFFD');

describe('text that is not plain Unicode', () => {
  it('lone surrogates reach the tokenizer as U+FFFD', async () => {
    for (const s of ['\uD800', 'a\uDC00b', 'x\uD83D', '\uDE00\uD83D']) {
      expect(model.tokenize(s)).toEqual(model.tokenize(wellFormed(s)));
      expect(model.decode(model.tokenize(s))).toBe(wellFormed(s));
    }
    expect(model.tokenize('\uD800')).toEqual(model.tokenize('\uFFFD'));
    const r = await model.generate('a\uDC00b', { maxNewTokens: 5, ignoreEos: true });
    expect(r.promptTokens).toEqual(model.tokenize('a\uFFFDb'));
    expect(r.tokens).toEqual((await model.generate('a\uFFFDb', { maxNewTokens: 5, ignoreEos: true })).tokens);
    // A stop string with a lone surrogate is a U+FFFD stop string.
    const stopped = await model.generate(ref.prompts[0].input_ids, { ...greedy, stop: '\uD800' });
    expect(stopped).toEqual({ ...(await model.generate(ref.prompts[0].input_ids, { ...greedy, stop: '\uFFFD' })), timings: stopped.timings });
  });

  it('NUL bytes are ordinary characters: tokenized as byte 0 and decoded back', async () => {
    const ids = model.tokenize('a\0b\0');
    expect(ids).toEqual([64, 188, 65, 188]); // 188 is byte 0 in GPT-2's byte-to-unicode table
    expect(model.decode(ids)).toBe('a\0b\0');
    const r = await model.generate('\0', { maxNewTokens: 5, ignoreEos: true, stop: ['\0\0\0\0\0\0'] });
    expect(r.promptTokens).toEqual([188]);
    expect(r.tokens).toHaveLength(5);
  });
});

describe('token ids', () => {
  it('negative, fractional, NaN, infinite and 2^32 ids are typed errors naming the index', async () => {
    for (const bad of [-1, 0.5, NaN, Infinity, 2 ** 32]) {
      const err = await model.generate([15496, bad]).catch((e) => e);
      expect(err).toBeInstanceOf(KvgptError);
      expect(err.code).toBe('KVGPT_INVALID_INPUT');
      expect(err.message).toMatch(/token id at index 1 must be a non-negative integer/);
      expect(() => model.decode([bad])).toThrow(expect.objectContaining({ code: 'KVGPT_INVALID_INPUT' }));
    }
  });
});

describe('every option at and past its bounds', () => {
  // [option, values accepted (at the bounds), values rejected with a RangeError (past them)]
  const bounds: [string, unknown[], unknown[]][] = [
    ['maxNewTokens', [0, 1_048_576], [-1, 1_048_577, 2.5, NaN, Infinity]],
    ['temperature', [0, 100, -0], [-1e-9, 100.000001, NaN, Infinity, -Infinity]],
    ['topK', [0, 4_294_967_295], [-1, 4_294_967_296, 1.5, NaN]],
    ['topP', [Number.MIN_VALUE, 1], [0, -0.5, 1.0000001, NaN, Infinity]],
    ['repetitionPenalty', [Number.MIN_VALUE, 100], [0, -1, 100.0001, NaN, Infinity]],
    ['seed', [0, Number.MAX_SAFE_INTEGER], [-1, 0.5, 2 ** 53, NaN, Infinity]],
    ['stop', ['x', ['a', 'b'], []], ['', ['a', '']]],
  ];
  const prompt = Array.from({ length: 120 }, (_, i) => 100 + i); // 8 positions left: context_full stops long runs

  it.each(bounds)('%s', async (name, accepted, rejected) => {
    for (const value of accepted) {
      const opts = { maxNewTokens: 3, temperature: 0.7, seed: 1, ignoreEos: true, [name]: value };
      const r = await model.generate(prompt, opts);
      expect(['max_new_tokens', 'context_full', 'stop_string']).toContain(r.stopReason);
    }
    for (const value of rejected) {
      const err = await model.generate(prompt, { [name]: value }).catch((e) => e);
      expect(err, `${name}: ${String(value)}`).toBeInstanceOf(RangeError);
      expect(err.code).toBe('KVGPT_OPTION_RANGE');
      expect(err.message).toContain(name);
    }
  });

  it('booleans and the signal take their type only; options must be an object', async () => {
    // Values whose own toString throws or is missing (found by the property test) included.
    const odd = [{ toString: 0 }, Object.create(null), Symbol('s'), () => 1];
    for (const opts of [{ ignoreEos: 'yes' }, { useCache: 0 }, { useCache: null }, { signal: new AbortController() }, { seed: 1n }, { stop: [1] }, ...odd.map((v) => ({ temperature: v })), { stop: Symbol('s') }]) {
      const err = await model.generate('x', opts as never).catch((e) => e);
      expect(err, JSON.stringify(Object.keys(opts))).toBeInstanceOf(TypeError);
      expect(err.code).toBe('KVGPT_OPTION_TYPE');
    }
    for (const prompt of odd) {
      const err = await model.generate(prompt as never).catch((e) => e);
      expect(err).toBeInstanceOf(TypeError);
      expect(err.message).toMatch(/^prompt must be a string or an array of token ids, got (an object|a function|symbol Symbol\(s\))$/);
    }
    for (const opts of [5, 'fast', [], true]) {
      const err = await model.generate('x', opts as never).catch((e) => e);
      expect(err).toBeInstanceOf(TypeError);
      expect(err.message).toMatch(/^options must be an object/);
    }
    // undefined and null mean the defaults.
    expect((await model.generate('x', null as never)).stopReason).toBeDefined();
    const load = await Gpt2.load(TINY, { devise: 'cpu' } as never).catch((e) => e);
    expect(load).toBeInstanceOf(TypeError);
    expect(load.message).toBe('unknown load option "devise"; known options: device, dtype, maxSequences, maxStepTokens, prefillChunk');
  });
});

describe('lifecycle', () => {
  it('an abort during prefill stops before the second token', async () => {
    // A model whose prefill of 800 tokens takes about a second here (3 layers of width 768).
    // The flag is checked before the first forward pass and after each sampled token, so an
    // abort landing in the prefill lets that one pass finish and returns its token.
    const big = await Gpt2.random({ n_layer: 3, n_head: 12, n_embd: 768, n_positions: 1024, vocab_size: 1000 }, { seed: 1 });
    const prompt = Array.from({ length: 800 }, (_, i) => (i * 7) % 1000);
    const opts = { maxNewTokens: 20, ignoreEos: true };
    const first = (await big.generate(prompt, { ...opts, maxNewTokens: 1 })).tokens;
    // Fired in the same tick as the call (the task may not have started) and 50 ms later
    // (inside the forward pass over the prompt).
    for (const delay of [0, 50]) {
      const controller = new AbortController();
      const running = big.generate(prompt, { ...opts, signal: controller.signal });
      if (delay) await new Promise((r) => setTimeout(r, delay));
      controller.abort();
      const r = await running;
      expect(r.stopReason).toBe('aborted');
      expect(r.tokens.length).toBeLessThanOrEqual(1);
      expect(r.tokens).toEqual(first.slice(0, r.tokens.length));
      expect(r.promptTokens).toHaveLength(800);
    }
    big.dispose();
  });

  it('an abort after the end changes nothing', async () => {
    const p = ref.prompts[1];
    const controller = new AbortController();
    const r = await model.generate(p.input_ids, { ...greedy, signal: controller.signal });
    const s = model.stream(p.input_ids, { ...greedy, signal: controller.signal });
    const streamed: number[] = [];
    for await (const c of s) streamed.push(c.token);
    controller.abort();
    expect(r.tokens).toEqual(p.greedy_new_ids);
    expect(r.stopReason).toBe('max_new_tokens');
    expect(streamed).toEqual(p.greedy_new_ids);
    expect((await s.result).stopReason).toBe('max_new_tokens');
    // The same (aborted) signal on a new call generates nothing; the model is fine.
    expect((await model.generate(p.input_ids, { ...greedy, signal: controller.signal })).tokens).toEqual([]);
    expect((await model.generate(p.input_ids, greedy)).tokens).toEqual(p.greedy_new_ids);
  });

  it('dispose while generating and streaming: both finish, new calls fail, sessions keep their weights', async () => {
    const m = await Gpt2.load(TINY);
    const [p0, p1] = ref.prompts;
    const session = m.session({ capacity: 16 });
    const running = m.generate(p0.input_ids, greedy);
    const stream = m.stream(p1.input_ids, greedy);
    m.dispose();
    m.dispose(); // a second dispose is a no-op
    expect(m.disposed).toBe(true);
    await expect(m.generate('x')).rejects.toMatchObject({ code: 'KVGPT_DISPOSED' });
    const late = m.stream('x');
    await expect(late.result).rejects.toMatchObject({ code: 'KVGPT_DISPOSED' });
    await expect(late[Symbol.asyncIterator]().next()).rejects.toBeInstanceOf(KvgptError);
    expect(() => m.session()).toThrow(expect.objectContaining({ code: 'KVGPT_DISPOSED' }));
    const streamed: number[] = [];
    for await (const c of stream) streamed.push(c.token);
    expect((await running).tokens).toEqual(p0.greedy_new_ids);
    expect(streamed).toEqual(p1.greedy_new_ids);
    // A session made before dispose holds the weights until it is dropped.
    expect(await session.feed(p0.input_ids)).toBe(p0.greedy_new_ids[0]);
  });
});
