export { Gpt2, Session, GPT2_SMALL, type RandomConfig, type Device, type DType, type LoadOptions, type ModelInfo, type GenerationStream, type EngineStats } from './model';
export type { GenerateOptions, GenerateResult, StopReason, TokenChunk } from './generate';
export type { Timings } from './timing';
export { KvgptError, type KvgptErrorCode } from './errors';
export type { ScoreOptions, ScoreResult, ScoredToken, ScoreTimings, Logprob, TokenLogprob } from './score';
export type { ServeOptions, Server } from './server';
import type { serve as Serve } from './server';
/** Starts an OpenAI-compatible completions server (see `kvgpt serve`); Fastify loads only when called. */
export async function serve(...args: Parameters<typeof Serve>): ReturnType<typeof Serve> {
  return (await import('./server.js')).serve(...args);
}
