// Continuous batching through the JS API: concurrent generate()/stream() calls and session
// feeds share forward passes (engineStats shows it) and each gets exactly the tokens it gets
// alone; generateBatch reproduces HF's left-padded batch; the engine's load options are
// checked; one request's bad input fails it alone; a fast-check property over random arrival
// times, lengths, options and aborts.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Gpt2, type GenerateOptions, type GenerateResult } from '../src';
import { reference, TINY } from './helpers';

const ref = reference(TINY);
const hfBatch: number[][] = JSON.parse(readFileSync(join(TINY, 'reference.json'), 'utf8')).batch_left_padded_greedy_new_ids;
const greedy = { maxNewTokens: 40, ignoreEos: true };
let model: Gpt2;

beforeAll(async () => {
  model = await Gpt2.load(TINY);
});
afterAll(() => model.dispose());

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const view = (r: GenerateResult) => ({ tokens: r.tokens, text: r.text, stop: r.stopReason });

describe('batching', () => {
  it('concurrent generate() and stream() calls share forward passes and give the reference ids', async () => {
    const before = model.engineStats();
    const runs = ref.prompts.map(async (p, i) => {
      if (i % 2 === 0) return (await model.generate(p.input_ids, greedy)).tokens;
      const s = model.stream(p.input_ids, greedy);
      const streamed: number[] = [];
      for await (const c of s) streamed.push(c.token);
      expect(streamed).toEqual((await s.result).tokens);
      return streamed;
    });
    const got = await Promise.all(runs);
    expect(got).toEqual(ref.prompts.map((p) => p.greedy_new_ids));
    const after = model.engineStats();
    const steps = after.steps - before.steps;
    // Alone, 5 prompts x 40 tokens take 200 forward passes; together far fewer.
    expect(steps).toBeLessThan(100);
    expect(after.maxBatch).toBeGreaterThanOrEqual(2);
    expect(after.meanBatchSize).toBeGreaterThan(1);
    expect(after.active).toBe(0);
    expect(after.waiting).toBe(0);
  });

  it("generateBatch reproduces HF's left-padded batched greedy ids, in prompt order", async () => {
    const results = await model.generateBatch(ref.prompts.map((p) => p.input_ids), greedy);
    expect(results.map((r) => r.tokens)).toEqual(hfBatch);
    for (const r of results) expect(r.timings.meanBatchSize).toBeGreaterThan(1);
    const text = await model.generateBatch(ref.prompts.map((p) => p.prompt), { maxNewTokens: 5, ignoreEos: true });
    expect(text.map((r) => r.tokens)).toEqual(ref.prompts.map((p) => p.greedy_new_ids.slice(0, 5)));
  });

  it('per-request options hold in a batch: seeds, stop strings, maxNewTokens, useCache, abort', async () => {
    const p = ref.prompts;
    const alone = async (prompt: number[], o: GenerateOptions) => view(await model.generate(prompt, o));
    const stop = model.decode(p[0].greedy_new_ids.slice(3, 6));
    const options: GenerateOptions[] = [
      { ...greedy, stop },
      { temperature: 0.9, topK: 40, seed: 7, maxNewTokens: 25 },
      { ...greedy, maxNewTokens: 3 },
      { ...greedy, useCache: false, maxNewTokens: 12 },
      { temperature: 1.2, topP: 0.8, seed: 11, repetitionPenalty: 1.3, maxNewTokens: 30, ignoreEos: true },
    ];
    const expected = [];
    for (let i = 0; i < 5; i++) expected.push(await alone(p[i].input_ids, options[i]));
    const controller = new AbortController();
    const aborted = model.stream(p[1].input_ids, { ...greedy, signal: controller.signal });
    const together = Promise.all(options.map((o, i) => model.generate(p[i].input_ids, o)));
    let n = 0;
    for await (const _ of aborted) if (++n === 4) controller.abort();
    const a = await aborted.result;
    expect(a.stopReason).toBe('aborted');
    expect(a.tokens).toEqual(p[1].greedy_new_ids.slice(0, a.tokens.length));
    expect((await together).map(view)).toEqual(expected);
    expect(expected[0].stop).toBe('stop_string');
  });

  it("one request's bad input fails it alone", async () => {
    const tooLong = Array.from({ length: 129 }, (_, i) => i);
    const results = await Promise.allSettled([
      model.generate(ref.prompts[0].input_ids, greedy),
      model.generate(tooLong, greedy),
      model.generate([1, 50257, 3], greedy),
      model.generate(ref.prompts[2].input_ids, { ...greedy, temperature: -1 }),
      model.generate(ref.prompts[3].input_ids, greedy),
    ]);
    expect(results.map((r) => r.status)).toEqual(['fulfilled', 'rejected', 'rejected', 'rejected', 'fulfilled']);
    const reason = (i: number) => (results[i] as PromiseRejectedResult).reason;
    expect(reason(1)).toMatchObject({ code: 'KVGPT_INVALID_INPUT', message: expect.stringContaining('prompt is 129 tokens') });
    expect(reason(2)).toMatchObject({ code: 'KVGPT_INVALID_INPUT' });
    expect(reason(3)).toBeInstanceOf(RangeError);
    expect((results[0] as PromiseFulfilledResult<GenerateResult>).value.tokens).toEqual(ref.prompts[0].greedy_new_ids);
    expect((results[4] as PromiseFulfilledResult<GenerateResult>).value.tokens).toEqual(ref.prompts[3].greedy_new_ids);
  });

  it('generateBatch names the failing prompt and aborts the rest', async () => {
    const prompts = [ref.prompts[0].input_ids, Array.from({ length: 129 }, (_, i) => i), ref.prompts[1].input_ids];
    await expect(model.generateBatch(prompts, greedy)).rejects.toMatchObject({
      code: 'KVGPT_INVALID_INPUT',
      message: expect.stringMatching(/^prompt 1: prompt is 129 tokens/),
    });
    await expect(model.generateBatch([ref.prompts[0].input_ids, 5 as never])).rejects.toMatchObject({ code: 'KVGPT_OPTION_TYPE' });
    await expect(model.generateBatch(prompts.slice(0, 1), { temperature: -1 })).rejects.toMatchObject({
      code: 'KVGPT_OPTION_RANGE',
      message: expect.stringMatching(/^temperature must be in \[0, 100\]/),
    });
    expect(await model.generateBatch([])).toEqual([]);
  });

  it('session feeds ride with generations and give the greedy ids', async () => {
    const p = ref.prompts[1];
    const session = model.session({ capacity: 64 });
    const gen = model.generate(ref.prompts[0].input_ids, greedy);
    // Feeds on one session queue in call order, even when not awaited one by one.
    const first = session.feed(p.input_ids);
    const second = first.then((id) => session.feed([id]));
    expect(await first).toBe(p.greedy_new_ids[0]);
    expect(await second).toBe(p.greedy_new_ids[1]);
    const q1 = session.feed([p.greedy_new_ids[1]]);
    const q2 = session.feed([p.greedy_new_ids[2]]);
    expect(await q1).toBe(p.greedy_new_ids[2]);
    expect(await q2).toBe(p.greedy_new_ids[3]);
    expect(session.length).toBe(p.input_ids.length + 3);
    expect((await gen).tokens).toEqual(ref.prompts[0].greedy_new_ids);
  });
});

describe('engine options', () => {
  it('queue past maxSequences in order, report waits, and keep results exact', async () => {
    const m = await Gpt2.load(TINY, { maxSequences: 2, maxStepTokens: 16, prefillChunk: 4 });
    try {
      const results = await Promise.all(ref.prompts.map((p) => m.generate(p.input_ids, greedy)));
      expect(results.map((r) => r.tokens)).toEqual(ref.prompts.map((p) => p.greedy_new_ids));
      const s = m.engineStats();
      expect(s).toMatchObject({ maxSequences: 2, maxStepTokens: 16, prefillChunk: 4, maxBatch: 2, admitted: 5, completed: 5, active: 0, waiting: 0 });
      expect(s.maxQueueMs).toBeGreaterThan(0);
      expect(results.some((r) => r.timings.queueMs > 0)).toBe(true);
      expect(s.generatedTokens).toBe(200);
    } finally {
      m.dispose();
    }
  });

  it('are checked at load: types, ranges, and how they relate', async () => {
    await expect(Gpt2.load(TINY, { maxSequences: '4' as never })).rejects.toMatchObject({ code: 'KVGPT_OPTION_TYPE' });
    await expect(Gpt2.load(TINY, { maxSequences: 0 })).rejects.toThrow(RangeError);
    await expect(Gpt2.load(TINY, { maxSequences: 1.5 })).rejects.toMatchObject({ code: 'KVGPT_OPTION_RANGE', message: expect.stringContaining('maxSequences') });
    await expect(Gpt2.load(TINY, { maxStepTokens: 70000 })).rejects.toMatchObject({ code: 'KVGPT_OPTION_RANGE' });
    await expect(Gpt2.load(TINY, { maxSequences: 8, maxStepTokens: 4 })).rejects.toMatchObject({ message: expect.stringContaining('maxStepTokens must be at least maxSequences (8)') });
    await expect(Gpt2.load(TINY, { maxStepTokens: 8, prefillChunk: 9 })).rejects.toMatchObject({ message: expect.stringContaining('prefillChunk must be at most maxStepTokens (8)') });
    const m = await Gpt2.random({ n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64, vocab_size: 100 }, { maxSequences: 600 });
    expect(m.engineStats()).toMatchObject({ maxSequences: 600, maxStepTokens: 600 }); // the default budget rises to fit
    m.dispose();
    expect(() => m.engineStats()).toThrow(expect.objectContaining({ code: 'KVGPT_DISPOSED' }));
  });
});

describe('property', () => {
  it('random arrival times, lengths, options and aborts: every result equals its solo run', async () => {
    const m = await Gpt2.load(TINY, { maxSequences: 3, maxStepTokens: 24, prefillChunk: 8 });
    const request = fc.record({
      length: fc.integer({ min: 0, max: 80 }),
      salt: fc.integer({ min: 0, max: 1000 }),
      delayMs: fc.integer({ min: 0, max: 30 }),
      maxNewTokens: fc.integer({ min: 0, max: 30 }),
      sample: fc.option(fc.record({ temperature: fc.double({ min: 0.1, max: 2, noNaN: true }), seed: fc.nat(), topK: fc.nat({ max: 60 }) }), { nil: undefined }),
      useCache: fc.boolean(),
      stop: fc.option(fc.constantFrom(' ', 'e', 'the'), { nil: undefined }),
      abortAfter: fc.option(fc.integer({ min: 1, max: 10 }), { nil: undefined }),
    });
    try {
      await fc.assert(
        fc.asyncProperty(fc.array(request, { minLength: 1, maxLength: 6 }), async (reqs) => {
          const run = async (r: (typeof reqs)[number], delay: boolean) => {
            if (delay) await sleep(r.delayMs);
            const prompt = Array.from({ length: r.length }, (_, i) => (i * 7919 + r.salt * 104729 + 11) % 50000);
            const controller = new AbortController();
            const o: GenerateOptions = { maxNewTokens: r.maxNewTokens, useCache: r.useCache, stop: r.stop, ignoreEos: true, signal: controller.signal, ...(r.sample ?? {}) };
            const s = m.stream(prompt, o);
            let n = 0;
            for await (const _ of s) if (++n === r.abortAfter) controller.abort();
            return view(await s.result);
          };
          const together = await Promise.all(reqs.map((r) => run(r, true)));
          for (let i = 0; i < reqs.length; i++) {
            const alone = await run(reqs[i], false);
            // An abort from the consumer lands a step or two after the token it reacts to (the
            // events cross threads), so with one the runs agree on their common prefix.
            if (reqs[i].abortAfter !== undefined) {
              const k = Math.min(alone.tokens.length, together[i].tokens.length);
              expect(together[i].tokens.slice(0, k)).toEqual(alone.tokens.slice(0, k));
            } else {
              expect(together[i]).toEqual(alone);
            }
          }
        }),
        { numRuns: 25, seed: 20261202 },
      );
    } finally {
      m.dispose();
    }
  });
});
