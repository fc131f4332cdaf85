// Scoring as JS users see it: options (types checked here, ranges by the native core), the
// result (each scored token with its text, log-probability and alternatives; the mean NLL and
// the perplexity), and the log-probabilities `generate({ logprobs })` adds to each token.

import type { NativeScore, NativeScoreOptions, NativeTokenLogprob } from '../index.js';
import { optionTypeError } from './errors';

export interface ScoreOptions {
  /** Tokens one window holds: integer in [2, n_positions]; default n_positions (the model's context). */
  maxLength?: number;
  /**
   * Tokens between window starts: integer in [1, maxLength]; default maxLength (windows side by
   * side). A text longer than maxLength is read in windows of maxLength tokens starting every
   * `stride` tokens, each scoring only the tokens no earlier window scored, as HF's perplexity
   * guide does; a smaller stride gives each token more context and costs more passes.
   */
  stride?: number;
  /** Also report the k most likely tokens at each scored position: integer in [0, 20]; default 0. */
  logprobs?: number;
  /**
   * Put the BOS token before the text, so its first token is scored too. Default false: as HF's
   * `labels=input_ids` loss, the first token is context only.
   */
  addBos?: boolean;
  /** Called as tokens are scored, with how many are done and how many there are in all. */
  onProgress?: (scored: number, total: number) => void;
  /** Aborting rejects the promise with KVGPT_ABORTED (a partial perplexity would mislead). */
  signal?: AbortSignal;
}

/** An id, its text and its log-probability (natural log). */
export interface Logprob {
  token: number;
  /** The token decoded alone ('' without a tokenizer; a piece of a UTF-8 character shows as U+FFFD). */
  text: string;
  logprob: number;
}

/** A token with its log-probability and the most likely tokens at its position. */
export interface TokenLogprob extends Logprob {
  /** The k most likely tokens (k = the logprobs option), most likely first; the lower id first on ties. */
  top: Logprob[];
}

/** A token of a scored text. */
export interface ScoredToken extends TokenLogprob {
  /** Its index in `ids`. */
  position: number;
  /**
   * The text this token completes in the scored text: the texts of all ids join to the text
   * ('' for a token that ends inside a UTF-8 character, whose text comes with the token that completes it).
   */
  text: string;
}

export interface ScoreTimings {
  /** From the call to the engine's admitting it. */
  queueMs: number;
  /** The forward passes that carried it (a pass shared with other requests counts whole). */
  forwardMs: number;
  /** Log-softmax of the scored rows and the alternatives. */
  logprobMs: number;
  totalMs: number;
  /** Positions run through the model: more than the ids where windows overlap. */
  forwardTokens: number;
  /** Ids of the text per second of totalMs. */
  tokensPerSecond: number;
  meanBatchSize: number;
}

export interface ScoreResult {
  /** The ids scored: the text's, after the BOS with addBos. */
  ids: number[];
  /** Every scored token in order: all ids but the first, unless windows side by side leave out each window's first. */
  tokens: ScoredToken[];
  /** Mean negative log-likelihood of the scored tokens, in nats (HF's `loss`). */
  nll: number;
  /** exp(nll). */
  perplexity: number;
  /** tokens.length. */
  scored: number;
  /** Forward windows the text was read in. */
  windows: number;
  timings: ScoreTimings;
}

const SCORE_NUMBERS = ['maxLength', 'stride', 'logprobs'] as const;
export const SCORE_OPTION_NAMES = [...SCORE_NUMBERS, 'addBos', 'onProgress', 'signal'];

/** Checks option types and keys; returns what the native layer takes. */
export function toNativeScoreOptions(options: ScoreOptions | undefined): NativeScoreOptions {
  if (options === undefined || options === null) return {};
  if (typeof options !== 'object' || Array.isArray(options)) throw optionTypeError('score options must be an object');
  for (const key of Object.keys(options)) {
    if (!SCORE_OPTION_NAMES.includes(key)) {
      throw optionTypeError(`unknown score option ${JSON.stringify(key)}; known options: ${SCORE_OPTION_NAMES.join(', ')}`);
    }
  }
  const out: NativeScoreOptions = {};
  for (const key of SCORE_NUMBERS) {
    const v = options[key];
    if (v === undefined) continue;
    if (typeof v !== 'number') throw optionTypeError(`option ${key} must be a number, got ${typeof v}`);
    out[key] = v;
  }
  if (options.addBos !== undefined) {
    if (typeof options.addBos !== 'boolean') throw optionTypeError(`option addBos must be a boolean, got ${typeof options.addBos}`);
    out.addBos = options.addBos;
  }
  if (options.onProgress !== undefined && typeof options.onProgress !== 'function') {
    throw optionTypeError(`option onProgress must be a function, got ${typeof options.onProgress}`);
  }
  if (options.signal !== undefined && !(options.signal instanceof AbortSignal)) {
    throw optionTypeError('option signal must be an AbortSignal');
  }
  return out;
}

/** Decodes ids alone, each once per call. */
export function tokenTexts(decode: (ids: number[]) => string): (id: number) => string {
  const seen = new Map<number, string>();
  return (id) => {
    let t = seen.get(id);
    if (t === undefined) {
      t = decode([id]);
      seen.set(id, t);
    }
    return t;
  };
}

export function scoreFromNative(s: NativeScore, text: (id: number) => string): ScoreResult {
  const k = s.topK;
  const tokens: ScoredToken[] = s.positions.map((position, i) => {
    const token = s.ids[position];
    const top: Logprob[] = [];
    for (let j = i * k; j < (i + 1) * k; j++) top.push({ token: s.topIds[j], text: text(s.topIds[j]), logprob: s.topLogprobs[j] });
    return { position, token, text: s.pieces ? s.pieces[position] : '', logprob: s.logprobs[i], top };
  });
  const t = s.timings;
  return {
    ids: s.ids,
    tokens,
    nll: s.nll,
    perplexity: s.perplexity,
    scored: tokens.length,
    windows: s.windows,
    timings: { ...t, tokensPerSecond: t.totalMs > 0 ? (s.ids.length * 1000) / t.totalMs : 0 },
  };
}

export function logprobFromNative(l: NativeTokenLogprob, text: (id: number) => string): TokenLogprob {
  return {
    token: l.token,
    text: text(l.token),
    logprob: l.logprob,
    top: l.top.map((a) => ({ token: a.token, text: text(a.token), logprob: a.logprob })),
  };
}
