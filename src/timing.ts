// Timings as the API reports them: the regions measured in Rust plus figures derived here.

import type { NativeTimings } from '../index.js';

export interface Timings {
  /** Time `load` took (weights, tokenizer), from the model. */
  loadMs: number;
  /** Wait for a place among the engine's sequences (0 unless `maxSequences` were in flight). */
  queueMs: number;
  /** The forward passes that read the prompt (one per chunk of `prefillChunk` tokens). */
  prefillMs: number;
  /** All later forward passes (one per token after the first). */
  decodeMs: number;
  /** Each later forward pass, in order. */
  stepMs: number[];
  /** Logit processing and drawing, all steps. */
  sampleMs: number;
  /** Time to first token: queue wait, prefill and its sampling. */
  ttftMs: number;
  /** The whole generation, from the call to the last token. */
  totalMs: number;
  /**
   * Mean number of sequences in the forward passes that carried this generation (1 when it ran
   * alone). A pass shared with others counts whole in each one's prefillMs / decodeMs.
   */
  meanBatchSize: number;
  promptTokens: number;
  generatedTokens: number;
  /** Generated tokens per second of totalMs. */
  tokensPerSecond: number;
  /** Mean decode step (decodeMs / steps); 0 when there was no decode step. */
  perTokenMs: number;
}

export function deriveTimings(t: NativeTimings, loadMs: number): Timings {
  const steps = t.stepMs.length;
  return {
    loadMs,
    queueMs: t.queueMs,
    prefillMs: t.prefillMs,
    decodeMs: t.decodeMs,
    stepMs: t.stepMs,
    sampleMs: t.sampleMs,
    ttftMs: t.ttftMs,
    totalMs: t.totalMs,
    meanBatchSize: t.meanBatchSize,
    promptTokens: t.promptTokens,
    generatedTokens: t.generatedTokens,
    tokensPerSecond: t.totalMs > 0 ? (t.generatedTokens * 1000) / t.totalMs : 0,
    perTokenMs: steps > 0 ? t.decodeMs / steps : 0,
  };
}
