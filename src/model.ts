// The Gpt2 class: load, generate, stream, tokenize/decode, info, dispose. Every heavy call runs
// in the native core off the JS thread; this file adds promises, AbortSignal, AsyncIterable
// streaming, Symbol.dispose, and typed errors.

import type { NativeModel, NativeModelInfo, NativeSession, NativeTokenChunk } from '../index.js';
import { requireBinding, requireCudaBinding } from './binding';
import { fromNative, KvgptError, native, optionTypeError } from './errors';
import { checkPrompt, toNativeOptions, type GenerateOptions, type GenerateResult, type StopReason, type TokenChunk } from './generate';
import { deriveTimings } from './timing';

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
  const known = ['device', 'dtype', ...extra];
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

/** One sequence held across calls, its KV cache allocated once; feed it ids one step at a time. */
export class Session {
  readonly #native: NativeSession;
  constructor(nativeSession: NativeSession) {
    this.#native = nativeSession;
  }
  /** Appends ids, runs the forward pass off the JS thread, resolves with the most likely next id. */
  async feed(ids: readonly number[]): Promise<number> {
    if (!Array.isArray(ids) || ids.length === 0) throw optionTypeError('feed takes a non-empty array of token ids');
    try {
      return await native(() => this.#native.feed([...ids]));
    } catch (e) {
      throw fromNative(e);
    }
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
      return new Gpt2(await binding.loadModel(model, { device: options.device, dtype: options.dtype }), binding);
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
      return new Gpt2(await binding.loadRandom(json, seed, { device: load.device, dtype: load.dtype }), binding);
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

  /** Generates from a text or token-id prompt and resolves with the whole result. */
  async generate(prompt: string | readonly number[], options?: GenerateOptions): Promise<GenerateResult> {
    return this.#run(prompt, options, undefined);
  }

  /** Generates and yields each token with the text it completes, as soon as it is sampled. */
  stream(prompt: string | readonly number[], options?: GenerateOptions): GenerationStream {
    const queue: TokenChunk[] = [];
    let wake: (() => void) | undefined;
    let received = 0;
    let finished: { result?: GenerateResult; error?: unknown } | undefined;
    const cancel = new this.#binding.CancelToken();
    const result = this.#run(prompt, options, (c) => {
      received++;
      queue.push({ token: c.token, text: c.text });
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
      return {
        text: g.text ?? '',
        tokens: g.tokens,
        promptTokens: g.promptTokens,
        stopReason: g.stopReason as StopReason,
        timings: deriveTimings(g.timings, this.#info.loadMs),
        cacheBytes: g.cacheBytes,
      };
    } catch (e) {
      throw fromNative(e);
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
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
