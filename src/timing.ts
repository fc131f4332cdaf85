// Timings as the API reports them: the regions measured in Rust plus figures derived here.

import type { NativeTimings } from '../index.js';

export interface Timings {
  /** Time `load` took (weights, tokenizer), from the model. */
  loadMs: number;
  /** The forward pass over the prompt. */
  prefillMs: number;
  /** All later forward passes (one per token after the first). */
  decodeMs: number;
  /** Each later forward pass, in order. */
  stepMs: number[];
  /** Logit processing and drawing, all steps. */
  sampleMs: number;
  /** Time to first token: prefill plus its sampling. */
  ttftMs: number;
  /** The whole generation, tokenization excluded. */
  totalMs: number;
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
    prefillMs: t.prefillMs,
    decodeMs: t.decodeMs,
    stepMs: t.stepMs,
    sampleMs: t.sampleMs,
    ttftMs: t.ttftMs,
    totalMs: t.totalMs,
    promptTokens: t.promptTokens,
    generatedTokens: t.generatedTokens,
    tokensPerSecond: t.totalMs > 0 ? (t.generatedTokens * 1000) / t.totalMs : 0,
    perTokenMs: steps > 0 ? t.decodeMs / steps : 0,
  };
}
