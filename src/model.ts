// The Gpt2 class: load, generate, stream, tokenize/decode, info, dispose. Every heavy call runs
// in the native core off the JS thread; this file adds promises, AbortSignal, AsyncIterable
// streaming, Symbol.dispose, and typed errors.

import type { NativeEngineStats, NativeModel, NativeModelInfo, NativeSession, NativeTokenChunk } from '../index.js';
import { requireBinding, requireCudaBinding } from './binding';
import { fromNative, KvgptError, native, optionTypeError } from './errors';
import { checkPrompt, toNativeOptions, type GenerateOptions, type GenerateResult, type StopReason, type TokenChunk } from './generate';
import { deriveTimings } from './timing';
import { logprobFromNative, scoreFromNative, tokenTexts, toNativeScoreOptions, type ScoreOptions, type ScoreResult } from './score';

const cpuBinding = requireBinding();
type Binding = typeof cpuBinding;

export type Device = 'cpu' | 'cuda' | 'auto';
export type DType = 'f32' | 'f16' | 'bf16' | 'q8_0';

export interface LoadOptions {
  /**
   * 'cpu' (default), 'cuda', or 'auto' (CUDA when the CUDA build of the addon loads and a GPU is
   * present, else CPU). 'cuda' where that is impossible is a KVGPT_DEVICE error naming what is
   * missing: the CUDA binary, the driver, a CUDA library, or the GPU.
   */
  device?: Device;
  /**
   * Weights dtype (converted once, at load): 'f32' (default), 'f16', 'bf16' or 'q8_0' (8-bit
   * blocks of 32 with a scale). On the CPU only the linear layers' weights change; activations
   * and the KV cache stay f32. On CUDA f16/bf16 also hold activations and the KV cache, and q8_0
   * quantizes the activations too. Logits are f32 everywhere.
   */
  dtype?: DType;
  /**
   * Sequences the model's engine runs at once: concurrent `generate()` / `stream()` calls and
   * session feeds share each forward pass (continuous batching); more wait their turn, in
   * order. Integer in [1, 65536]; default 32 on the CPU, 256 on CUDA. Each sequence in flight
   * holds its own KV cache: `cacheBytes(prompt + maxNewTokens)` bytes.
   */
  maxSequences?: number;
  /**
   * Tokens one forward pass carries: one per decoding sequence, then prompt chunks while they
   * fit (the oldest waiting chunk always goes). Integer in [maxSequences, 65536]; default 512
   * on the CPU, 8192 on CUDA (or maxSequences, if larger).
   */
  maxStepTokens?: number;
  /**
   * Prompt tokens one sequence reads per step: a longer prompt is read in chunks of this many,
   * so it does not stall the others' next tokens for a whole prefill. Integer in [1,
   * maxStepTokens]; default 256 on the CPU, 512 on CUDA.
   */
  prefillChunk?: number;
}

const ENGINE_OPTIONS = ['maxSequences', 'maxStepTokens', 'prefillChunk'] as const;

/** What the model's engine did since load and holds now (`model.engineStats()`). */
export interface EngineStats {
  /** The limits it runs under (the load options, or their defaults). */
  maxSequences: number;
  maxStepTokens: number;
  prefillChunk: number;
  /** Forward passes run. */
  steps: number;
  /** Tokens those passes carried (prompt chunks, decode tokens, cache-less passes). */
  rows: number;
  /** Sequences summed over the passes; `meanBatchSize` = sequences / steps. */
  sequences: number;
  meanBatchSize: number;
  /** The most sequences one pass carried. */
  maxBatch: number;
  generatedTokens: number;
  /** Milliseconds in forward passes (launching them and, on a GPU, waiting for them). */
  busyMs: number;
  /** Of busyMs, waiting for the device to finish (0 on the CPU). */
  syncMs: number;
  /** Milliseconds after the passes: logits to ids (argmax or sampling), stop checks, events. */
  sampleMs: number;
  /** Requests given a place, their mean and longest wait for it (ms). */
  admitted: number;
  meanQueueMs: number;
  maxQueueMs: number;
  /** Requests ended (done, stopped, aborted or failed). */
  completed: number;
  /** Sequences in flight and requests waiting, now. */
  active: number;
  waiting: number;
}

function engineStats(s: NativeEngineStats): EngineStats {
  const { queueMs, ...rest } = s;
  return {
    ...rest,
    meanBatchSize: s.steps > 0 ? s.sequences / s.steps : 0,
    meanQueueMs: s.admitted > 0 ? queueMs / s.admitted : 0,
  };
}

/** The addon build that serves `device`: the CUDA build for 'cuda', and for 'auto' when it loads. */
function bindingFor(device: Device | undefined): Binding {
  if (device !== 'cuda' && device !== 'auto') return cpuBinding;
  const cuda = requireCudaBinding();
  if ('binding' in cuda) return cuda.binding;
  if (device === 'auto') return cpuBinding;
  throw new KvgptError('KVGPT_DEVICE', `device 'cuda' is not available: ${cuda.missing}; or use device 'cpu' or 'auto'`);
}

function checkLoadOptions(options: unknown, extra: string[] = []): asserts options is LoadOptions {
  if (typeof options !== 'object' || options === null) throw optionTypeError('load options must be an object');
  const known = ['device', 'dtype', ...ENGINE_OPTIONS, ...extra];
  for (const key of Object.keys(options)) {
    if (!known.includes(key)) throw optionTypeError(`unknown load option ${JSON.stringify(key)}; known options: ${known.join(', ')}`);
  }
  const o = options as Record<string, unknown>;
  if (o.device !== undefined && typeof o.device !== 'string') {
    throw optionTypeError(`option device must be 'cpu', 'cuda' or 'auto', got ${typeof o.device}`);
  }
  if (o.dtype !== undefined && typeof o.dtype !== 'string') {
    throw optionTypeError(`option dtype must be 'f32', 'f16', 'bf16' or 'q8_0', got ${typeof o.dtype}`);
  }
  for (const key of ENGINE_OPTIONS) {
    if (o[key] !== undefined && typeof o[key] !== 'number') throw optionTypeError(`option ${key} must be a number, got ${typeof o[key]}`);
  }
}

/** The load options the native layer takes. */
function nativeLoadOptions(o: LoadOptions) {
  return { device: o.device, dtype: o.dtype, maxSequences: o.maxSequences, maxStepTokens: o.maxStepTokens, prefillChunk: o.prefillChunk };
}

export type ModelInfo = NativeModelInfo;

/** HF config.json fields for `Gpt2.random`; omitted ones take GPT-2 small's values. */
export interface RandomConfig {
  n_layer?: number;
  n_head?: number;
  n_embd?: number;
  n_positions?: number;
  n_inner?: number | null;
  vocab_size?: number;
  activation_function?: string;
}

export const GPT2_SMALL = { n_layer: 12, n_head: 12, n_embd: 768, n_positions: 1024, vocab_size: 50257 } as const;

/**
 * One sequence held across calls, its KV cache allocated once; feed it ids one step at a time.
 * Feeds go through the model's engine, batched with whatever else runs on the model; feeds on
 * one session run in call order.
 */
export class Session {
  readonly #native: NativeSession;
  /** The last feed queued: the next one starts after it settles. */
  #tail: Promise<unknown> = Promise.resolve();
  constructor(nativeSession: NativeSession) {
    this.#native = nativeSession;
  }
  /** Appends ids, runs them off the JS thread, resolves with the most likely next id. */
  feed(ids: readonly number[]): Promise<number> {
    if (!Array.isArray(ids) || ids.length === 0) return Promise.reject(optionTypeError('feed takes a non-empty array of token ids'));
    const copy = [...ids];
    const run = this.#tail.then(
      () => native(() => this.#native.feed(copy)),
    ).catch((e: unknown) => {
      throw fromNative(e);
    });
    this.#tail = run.catch(() => undefined);
    return run;
  }
  /** Keeps the first `length` tokens and forgets the rest (the cache stays allocated). */
  truncate(length: number): void {
    native(() => this.#native.truncate(length));
  }
  get length(): number {
    return native(() => this.#native.length);
  }
  get cacheBytes(): number {
    return native(() => this.#native.cacheBytes);
  }
}

/** A streamed generation: iterate it for tokens; `result` resolves when it ends. */
export interface GenerationStream extends AsyncIterable<TokenChunk> {
  readonly result: Promise<GenerateResult>;
}

export class Gpt2 implements Disposable {
  readonly #native: NativeModel;
  readonly #info: ModelInfo;
  /** The addon build this model lives in (CPU or CUDA): its CancelToken class is the one its calls accept. */
  readonly #binding: Binding;

  private constructor(nativeModel: NativeModel, binding: Binding) {
    this.#native = nativeModel;
    this.#binding = binding;
    this.#info = native(() => nativeModel.info());
  }

  /** Loads a checkpoint directory (config.json + weights + tokenizer) or a Hugging Face hub id. */
  static async load(model: string, options: LoadOptions = {}): Promise<Gpt2> {
    if (typeof model !== 'string') throw optionTypeError(`model must be a directory or hub id string, got ${typeof model}`);
    checkLoadOptions(options);
    const binding = bindingFor(options.device);
    try {
      return new Gpt2(await binding.loadModel(model, nativeLoadOptions(options)), binding);
    } catch (e) {
      throw fromNative(e);
    }
  }

  /**
   * A model of GPT-2 small's shapes (or `config`'s) with seeded random weights and no tokenizer:
   * for benchmarks, whose timings do not depend on the weights. Pass token ids to it.
   */
  static async random(config: RandomConfig = {}, options: LoadOptions & { seed?: number } = {}): Promise<Gpt2> {
    checkLoadOptions(options, ['seed']);
    const { seed = 0, ...load } = options;
    const json = JSON.stringify({ model_type: 'gpt2', activation_function: 'gelu_new', bos_token_id: 50256, eos_token_id: 50256, ...GPT2_SMALL, ...config });
    const binding = bindingFor(load.device);
    try {
      return new Gpt2(await binding.loadRandom(json, seed, nativeLoadOptions(load)), binding);
    } catch (e) {
      throw fromNative(e);
    }
  }

  /** A session for at most `capacity` positions (default: the model's context). */
  session(options: { capacity?: number; useCache?: boolean } = {}): Session {
    this.#check();
    const capacity = options.capacity ?? this.#info.nPositions;
    return new Session(native(() => this.#native.session(capacity, options.useCache ?? true)));
  }

  /** Config, parameter count, KV-cache bytes per token, device, load time. */
  get info(): ModelInfo {
    this.#check();
    return this.#info;
  }

  get disposed(): boolean {
    return this.#native.disposed;
  }

  /** KV-cache bytes for `positions` x `batch`: 2 x n_layer x n_embd x positions x batch x bytes per element. */
  cacheBytes(positions: number, batch = 1): number {
    return native(() => this.#native.cacheBytes(positions, batch));
  }

  tokenize(text: string): number[] {
    if (typeof text !== 'string') throw optionTypeError(`text must be a string, got ${typeof text}`);
    return native(() => this.#native.tokenize(text));
  }

  decode(ids: readonly number[]): string {
    if (!Array.isArray(ids)) throw optionTypeError('ids must be an array of token ids');
    return native(() => this.#native.decode([...ids]));
  }

  /**
   * Checks a prompt and generation options as `generate()` would, on this thread and without
   * running anything: returns the prompt's ids as the model will see them (an empty prompt
   * becomes `[bos]`), or throws the error `generate()` would reject with (a prompt over the
   * context, a token id out of range, an option out of range).
   */
  checkPrompt(prompt: string | readonly number[], options?: GenerateOptions): number[] {
    this.#check();
    const p = checkPrompt(prompt);
    const nativeOptions = toNativeOptions(options);
    return native(() => this.#native.checkGeneration(p, nativeOptions));
  }

  /**
   * Generates from a text or token-id prompt and resolves with the whole result. Concurrent
   * calls on one model are batched by its engine (each keeps its own options and results).
   */
  async generate(prompt: string | readonly number[], options?: GenerateOptions): Promise<GenerateResult> {
    return this.#run(prompt, options, undefined);
  }

  /**
   * Generates from every prompt at once, batched, with the same options; resolves with the
   * results in prompt order. If one prompt fails (bad input), the others are aborted and the
   * promise rejects with that error, its message prefixed with the prompt's index (`prompt 2:
   * ...`); an option out of range rejects as it would for `generate`.
   */
  async generateBatch(prompts: readonly (string | readonly number[])[], options?: GenerateOptions): Promise<GenerateResult[]> {
    this.#check();
    if (!Array.isArray(prompts)) throw optionTypeError('generateBatch takes an array of prompts (strings or arrays of token ids)');
    const checked = prompts.map((p) => checkPrompt(p));
    toNativeOptions(options); // types checked once, before any work
    const cancels = checked.map(() => new this.#binding.CancelToken());
    let failed = false;
    const runs = checked.map((p, i) =>
      this.#run(p, options, undefined, cancels[i]).catch((e: unknown) => {
        if (!failed) {
          failed = true;
          for (const c of cancels) c.cancel();
        }
        // An option out of range fails every prompt alike; anything else names its prompt.
        const code = (e as { code?: string }).code;
        if (e instanceof Error && code !== 'KVGPT_OPTION_RANGE' && code !== 'KVGPT_OPTION_TYPE') e.message = `prompt ${i}: ${e.message}`;
        throw e;
      }),
    );
    // Every run settles (the others are aborted on the first failure); the first error wins.
    const settled = await Promise.allSettled(runs);
    const rejected = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (rejected) throw rejected.reason;
    return settled.map((r) => (r as PromiseFulfilledResult<GenerateResult>).value);
  }

  /** What the model's engine did since load (steps, batch sizes, queue waits) and holds now. */
  engineStats(): EngineStats {
    this.#check();
    return engineStats(native(() => this.#native.engineStats()));
  }

  /** Generates and yields each token with the text it completes, as soon as it is sampled. */
  stream(prompt: string | readonly number[], options?: GenerateOptions): GenerationStream {
    const queue: TokenChunk[] = [];
    let wake: (() => void) | undefined;
    let received = 0;
    let finished: { result?: GenerateResult; error?: unknown } | undefined;
    const cancel = new this.#binding.CancelToken();
    const text = tokenTexts((ids) => this.#decodeOrEmpty(ids));
    const result = this.#run(prompt, options, (c) => {
      received++;
      queue.push(c.logprob ? { token: c.token, text: c.text, logprob: logprobFromNative(c.logprob, text) } : { token: c.token, text: c.text });
      wake?.();
    }, cancel);
    result.then(
      (r) => { finished = { result: r }; wake?.(); },
      (e) => { finished = { error: e }; wake?.(); },
    );
    async function* iterate(): AsyncGenerator<TokenChunk> {
      try {
        for (;;) {
          if (queue.length > 0) {
            yield queue.shift()!;
            continue;
          }
          // Token events and the final result travel separately; end only when every token arrived.
          if (finished?.error) throw finished.error;
          if (finished?.result && received >= finished.result.tokens.length) return;
          await new Promise<void>((resolve) => { wake = resolve; });
          wake = undefined;
        }
      } finally {
        if (!finished) cancel.cancel(); // the consumer stopped early
      }
    }
    return { result, [Symbol.asyncIterator]: iterate };
  }

  async #run(
    prompt: string | readonly number[],
    options: GenerateOptions | undefined,
    onToken: ((c: NativeTokenChunk) => void) | undefined,
    cancel = new this.#binding.CancelToken(),
  ): Promise<GenerateResult> {
    this.#check();
    const p = checkPrompt(prompt);
    const nativeOptions = toNativeOptions(options);
    const signal = options?.signal;
    const onAbort = () => cancel.cancel();
    if (signal?.aborted) cancel.cancel();
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      const g = await native(() => this.#native.generate(p, nativeOptions, cancel, onToken));
      const result: GenerateResult = {
        text: g.text ?? '',
        tokens: g.tokens,
        promptTokens: g.promptTokens,
        stopReason: g.stopReason as StopReason,
        timings: deriveTimings(g.timings, this.#info.loadMs),
        cacheBytes: g.cacheBytes,
      };
      if (g.logprobs) {
        const text = tokenTexts((ids) => this.#decodeOrEmpty(ids));
        result.logprobs = g.logprobs.map((l) => logprobFromNative(l, text));
      }
      return result;
    } catch (e) {
      throw fromNative(e);
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
  }

  /**
   * Scores a text (or token ids): each token's log-probability given the ones before it, the
   * mean negative log-likelihood (HF's `loss` with labels = input_ids) and the perplexity. A text
   * longer than `maxLength` (default: the model's context) is read in sliding windows (see
   * `ScoreOptions.stride`). Runs on the model's engine, batched with whatever else runs.
   */
  async score(text: string | readonly number[], options?: ScoreOptions): Promise<ScoreResult> {
    return this.#score(text, options, new this.#binding.CancelToken());
  }

  /**
   * Scores every text at once, batched, with the same options; resolves with the results in
   * order. If one text fails (bad input), the others are aborted and the promise rejects with
   * that error, its message prefixed with the text's index (`text 2: ...`).
   */
  async scoreBatch(texts: readonly (string | readonly number[])[], options?: ScoreOptions): Promise<ScoreResult[]> {
    this.#check();
    if (!Array.isArray(texts)) throw optionTypeError('scoreBatch takes an array of texts (strings or arrays of token ids)');
    const checked = texts.map((t) => checkPrompt(t));
    toNativeScoreOptions(options);
    const cancels = checked.map(() => new this.#binding.CancelToken());
    let failed = false;
    const runs = checked.map((t, i) =>
      this.#score(t, options, cancels[i]).catch((e: unknown) => {
        if (!failed) {
          failed = true;
          for (const c of cancels) c.cancel();
        }
        const code = (e as { code?: string }).code;
        if (e instanceof Error && code !== 'KVGPT_OPTION_RANGE' && code !== 'KVGPT_OPTION_TYPE' && code !== 'KVGPT_ABORTED') e.message = `text ${i}: ${e.message}`;
        throw e;
      }),
    );
    const settled = await Promise.allSettled(runs);
    const rejected = settled.filter((r): r is PromiseRejectedResult => r.status === 'rejected');
    // The first error that is not an abort the failure caused.
    if (rejected.length) throw (rejected.find((r) => (r.reason as { code?: string }).code !== 'KVGPT_ABORTED') ?? rejected[0]).reason;
    return settled.map((r) => (r as PromiseFulfilledResult<ScoreResult>).value);
  }

  async #score(text: string | readonly number[], options: ScoreOptions | undefined, cancel: InstanceType<Binding['CancelToken']>): Promise<ScoreResult> {
    this.#check();
    if (typeof text !== 'string' && !(Array.isArray(text) && text.every((x) => typeof x === 'number'))) {
      throw optionTypeError('score takes a string or an array of token ids');
    }
    const nativeOptions = toNativeScoreOptions(options);
    const onProgress = options?.onProgress;
    const signal = options?.signal;
    const onAbort = () => cancel.cancel();
    if (signal?.aborted) cancel.cancel();
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      const input = typeof text === 'string' ? text : [...text];
      const s = await native(() => this.#native.score(input, nativeOptions, cancel, onProgress ? (p) => onProgress(p.scored, p.total) : undefined));
      return scoreFromNative(s, tokenTexts((ids) => this.#decodeOrEmpty(ids)));
    } catch (e) {
      throw fromNative(e);
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
  }

  /** Decodes ids, or '' for a model without a tokenizer. */
  #decodeOrEmpty(ids: number[]): string {
    return this.#info.hasTokenizer ? this.#native.decode(ids) : '';
  }

  /** Frees the weights (after running generations end); every later call throws KVGPT_DISPOSED. */
  dispose(): void {
    this.#native.dispose();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  #check(): void {
    if (this.#native.disposed) throw new KvgptError('KVGPT_DISPOSED', 'the model was disposed; load it again to use it');
  }
}
