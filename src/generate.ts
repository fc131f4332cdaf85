// Generation options as JS users pass them: their types are checked here (TypeError, unknown
// keys rejected with the known ones listed); their ranges are checked once, by the native core,
// before any work starts (RangeError).

import type { NativeGenerateOptions } from '../index.js';
import { optionTypeError } from './errors';
import type { Timings } from './timing';
import type { TokenLogprob } from './score';

export interface GenerateOptions {
  /** New tokens at most: integer in [0, 1048576]. Default 50, or the checkpoint's max_new_tokens. Generation also stops at the model's context (n_positions). */
  maxNewTokens?: number;
  /** 0 = greedy; > 0 samples at that temperature; [0, 100]. Default: the checkpoint's generation_config.json, else greedy. */
  temperature?: number;
  /** With sampling: keep the k most likely tokens; integer >= 0, 0 = off. Default 50 (HF's). */
  topK?: number;
  /** With sampling: nucleus mass to keep, (0, 1]; 1 = off (default). */
  topP?: number;
  /** HF's repetition penalty, (0, 100]; 1 = off (default). Applies to greedy too. */
  repetitionPenalty?: number;
  /** Seed of the sampler, integer in [0, 2^53 - 1]; the same seed gives the same tokens. */
  seed?: number;
  /** Stop when the new text contains this string (or one of these); the text ends before it. */
  stop?: string | readonly string[];
  /** Keep generating past the EOS token. Default false. */
  ignoreEos?: boolean;
  /** false recomputes the whole sequence each step, as HF's use_cache=False. Default true. */
  useCache?: boolean;
  /**
   * Report each new token's log-probability and the k most likely alternatives, integer k in
   * [0, 20]. They come from the model's logits before the repetition penalty, temperature,
   * top-k and top-p (as OpenAI reports them), so they say what the model thought, not what the
   * sampler drew from. Default: none computed (and on a GPU a greedy step copies back one id).
   */
  logprobs?: number;
  /** Aborting stops the generation within one step; the result so far is returned with stopReason 'aborted'. */
  signal?: AbortSignal;
}

export type StopReason = 'max_new_tokens' | 'eos' | 'stop_string' | 'aborted' | 'context_full';

export interface GenerateResult {
  /** The new text (the prompt not included), ending before a stop string; '' without a tokenizer. */
  text: string;
  /** The new token ids; an EOS that stopped generation is the last one. */
  tokens: number[];
  /** The prompt's ids as the model saw them (an empty prompt becomes [bos]). */
  promptTokens: number[];
  stopReason: StopReason;
  timings: Timings;
  /** Bytes of this generation's KV cache (0 with useCache false). */
  cacheBytes: number;
  /** With the logprobs option: one per new token. */
  logprobs?: TokenLogprob[];
}

export interface TokenChunk {
  /** The new token id. */
  token: number;
  /** The text this token completes; '' while it is part of an unfinished character or held back for a stop string. */
  text: string;
  /** With the logprobs option: its log-probability and the alternatives. */
  logprob?: TokenLogprob;
}

type Kind = 'number' | 'boolean' | 'strings';
const KINDS: Record<keyof Omit<GenerateOptions, 'signal'>, Kind> = {
  maxNewTokens: 'number',
  temperature: 'number',
  topK: 'number',
  topP: 'number',
  repetitionPenalty: 'number',
  seed: 'number',
  stop: 'strings',
  ignoreEos: 'boolean',
  useCache: 'boolean',
  logprobs: 'number',
};
export const OPTION_NAMES = [...Object.keys(KINDS), 'signal'];

/** Checks option types and keys; returns what the native layer takes. */
export function toNativeOptions(options: GenerateOptions | undefined): NativeGenerateOptions {
  if (options === undefined || options === null) return {};
  if (typeof options !== 'object' || Array.isArray(options)) {
    throw optionTypeError(`options must be an object, got ${describe(options)}`);
  }
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(options)) {
    if (value === undefined || key === 'signal') continue;
    const kind = (KINDS as Record<string, Kind | undefined>)[key];
    if (!kind) {
      throw optionTypeError(`unknown option ${JSON.stringify(key)}; known options: ${OPTION_NAMES.join(', ')}`);
    }
    if (kind === 'strings') {
      const list = typeof value === 'string' ? [value] : value;
      if (!Array.isArray(list) || !list.every((s) => typeof s === 'string')) {
        throw optionTypeError(`option stop must be a string or an array of strings, got ${describe(value)}`);
      }
      out[key] = [...list];
    } else if (typeof value !== kind) {
      throw optionTypeError(`option ${key} must be a ${kind}, got ${describe(value)}`);
    } else {
      out[key] = value;
    }
  }
  const signal = options.signal;
  if (signal !== undefined && !(signal instanceof AbortSignal)) {
    throw optionTypeError(`option signal must be an AbortSignal, got ${describe(signal)}`);
  }
  return out as NativeGenerateOptions;
}

/** A prompt is text or an array of token ids. */
export function checkPrompt(prompt: unknown): string | number[] {
  if (typeof prompt === 'string') return prompt;
  if (Array.isArray(prompt) && prompt.every((x) => typeof x === 'number')) return [...prompt];
  throw optionTypeError(`prompt must be a string or an array of token ids, got ${describe(prompt)}`);
}

/** Names a value for an error message without calling its own methods (which may throw). */
function describe(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  if (typeof v === 'string') return `the string ${JSON.stringify(v)}`;
  if (typeof v === 'object') return 'an object';
  if (typeof v === 'function') return 'a function';
  return `${typeof v} ${String(v)}`;
}
