// Property tests (fast-check): the GPT-2 byte-level tokenizer round-trips any Unicode text, and
// the option validator sorts any option object into accepted, RangeError or TypeError.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { Gpt2 } from '../src';
import { OPTION_NAMES } from '../src/generate';
import { TINY } from './helpers';

let model: Gpt2;
beforeAll(async () => {
  model = await Gpt2.load(TINY);
});
afterAll(() => model.dispose());

const RUNS = { numRuns: 200 };

/** What napi's string conversion does to lone surrogates: each becomes U+FFFD. */
const wellFormed = (s: string) => s.replace(/[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/g, '\uFFFD');

describe('tokenizer round trip', () => {
  it('decode(tokenize(s)) === s for valid Unicode (any code point, NUL and <|endoftext|> included)', () => {
    const text = fc.oneof(
      fc.string({ unit: 'binary', maxLength: 64 }), // any code point, no lone surrogates
      fc.string({ unit: 'grapheme', maxLength: 32 }), // multi-code-point graphemes (emoji, combining marks)
      fc.array(fc.constantFrom('<|endoftext|>', ' ', '\0', '\n', 'é', '明天', '\u{1F600}', "'s", '  '), { maxLength: 12 }).map((a) => a.join('')),
    );
    fc.assert(
      fc.property(text, (s) => {
        const ids = model.tokenize(s);
        expect(ids.every((id) => Number.isInteger(id) && id >= 0 && id < 50257)).toBe(true);
        expect(model.decode(ids)).toBe(s);
      }),
      RUNS,
    );
  });

  it('lone surrogates are replaced by U+FFFD, and nothing else changes', () => {
    const lone = fc.oneof(fc.integer({ min: 0xd800, max: 0xdfff }).map((c) => String.fromCharCode(c)));
    const withLone = fc
      .array(fc.oneof(fc.string({ unit: 'binary', maxLength: 8 }), lone), { minLength: 1, maxLength: 8 })
      .map((parts) => parts.join(''));
    fc.assert(
      fc.property(withLone, (s) => {
        const ids = model.tokenize(s);
        expect(ids).toEqual(model.tokenize(wellFormed(s)));
        expect(model.decode(ids)).toBe(wellFormed(s));
      }),
      RUNS,
    );
  });
});

describe('option validator', () => {
  type Outcome = 'ok' | 'range' | 'type';
  type Entry = [key: string, value: unknown, outcome: Outcome];
  const wrongType = fc.oneof(
    fc.string(),
    fc.boolean(),
    fc.constant(null),
    fc.bigInt(),
    fc.object({ maxDepth: 1 }), // includes objects whose toString is not a function
    fc.constantFrom(Object.create(null), Symbol('s'), () => 1),
    fc.array(fc.integer(), { maxLength: 3 }),
  );
  const notNumber = wrongType.filter((v) => typeof v !== 'number');
  const nonFinite = fc.constantFrom(NaN, Infinity, -Infinity);
  const entry = (key: string, ok: fc.Arbitrary<unknown>, range: fc.Arbitrary<unknown> | null, type: fc.Arbitrary<unknown>) =>
    // Weighted towards valid values, so that many whole sets are valid or fail on ranges only.
    fc.oneof(
      { arbitrary: ok.map((v): Entry => [key, v, 'ok']), weight: 6 },
      ...(range ? [{ arbitrary: range.map((v): Entry => [key, v, 'range']), weight: 2 }] : []),
      { arbitrary: type.map((v): Entry => [key, v, 'type']), weight: 1 },
    );
  const wholeOutside = (max: number) =>
    fc.oneof(
      fc.integer({ min: -(2 ** 31), max: -1 }),
      fc.double({ min: max + 1, max: 1e300, noNaN: true }),
      fc.integer({ min: 0, max: 1000 }).map((i) => i + 0.5), // not a whole number
      nonFinite,
    );
  const entries = [
    entry('maxNewTokens', fc.integer({ min: 0, max: 1_048_576 }), wholeOutside(1_048_576), notNumber),
    entry('temperature', fc.double({ min: 0, max: 100, noNaN: true }), fc.oneof(fc.double({ min: -1e300, max: -1e-300 }), fc.double({ min: 100.0000001, max: 1e300 }), nonFinite), notNumber),
    entry('topK', fc.bigInt({ min: 0n, max: 4_294_967_295n }).map(Number), wholeOutside(4_294_967_295), notNumber),
    entry('topP', fc.double({ min: Number.MIN_VALUE, max: 1, noNaN: true }), fc.oneof(fc.double({ min: -1e300, max: 0, noNaN: true }), fc.double({ min: 1.0000001, max: 1e300 }), nonFinite), notNumber),
    entry('repetitionPenalty', fc.double({ min: Number.MIN_VALUE, max: 100, noNaN: true }), fc.oneof(fc.double({ min: -1e300, max: 0, noNaN: true }), fc.double({ min: 100.0000001, max: 1e300 }), nonFinite), notNumber),
    entry('seed', fc.maxSafeNat(), wholeOutside(Number.MAX_SAFE_INTEGER), notNumber),
    entry(
      'stop',
      fc.oneof(fc.string({ minLength: 1 }), fc.array(fc.string({ minLength: 1 }), { maxLength: 3 })),
      fc.oneof(fc.constant(''), fc.array(fc.string({ minLength: 1 }), { maxLength: 2 }).map((a) => [...a, ''])),
      fc.oneof(fc.integer(), fc.boolean(), fc.constant(null), fc.array(fc.integer(), { minLength: 1, maxLength: 2 })),
    ),
    entry('ignoreEos', fc.boolean(), null, fc.oneof(fc.integer(), fc.string(), fc.constant(null))),
    entry('useCache', fc.boolean(), null, fc.oneof(fc.integer(), fc.string(), fc.constant(null))),
  ];
  // Keys that are not options.
  const unknownKey = fc
    .string({ minLength: 1, maxLength: 12 })
    .filter((k) => !OPTION_NAMES.includes(k) && k !== '__proto__')
    .map((k): Entry => [k, 1, 'type']);
  // Any subset of the options; an unknown key in about one set in eight.
  const optionSets = fc
    .tuple(fc.subarray(entries.map((_, i) => i)), fc.oneof({ arbitrary: fc.constant(null), weight: 7 }, { arbitrary: unknownKey, weight: 1 }))
    .chain(([picked, unknown]) => fc.tuple(...picked.map((i) => entries[i]), ...(unknown ? [fc.constant(unknown)] : [])));

  it('accepts valid options, rejects ranges with RangeError and types or keys with TypeError, and never crashes', async () => {
    await fc.assert(
      fc.asyncProperty(optionSets, async (chosen) => {
        const options: Record<string, unknown> = Object.fromEntries(chosen.map(([k, v]) => [k, v]));
        // Types and keys are checked first (TypeError), then ranges (RangeError).
        const expected: Outcome = chosen.some((e) => e[2] === 'type') ? 'type' : chosen.some((e) => e[2] === 'range') ? 'range' : 'ok';
        // An aborted signal: valid options resolve at once without running the model.
        const outcome = await model.generate([1, 2, 3], { ...options, signal: AbortSignal.abort() }).then(
          (r) => {
            expect(r).toMatchObject({ stopReason: 'aborted', tokens: [] });
            return 'ok' as const;
          },
          (e) => {
            if (e instanceof RangeError && (e as { code?: string }).code === 'KVGPT_OPTION_RANGE') return 'range' as const;
            if (e instanceof TypeError && (e as { code?: string }).code === 'KVGPT_OPTION_TYPE') return 'type' as const;
            throw e;
          },
        );
        expect(outcome, JSON.stringify(chosen, (_, v) => (typeof v === 'bigint' ? `${v}n` : v))).toBe(expected);
      }),
      RUNS,
    );
  });
});
