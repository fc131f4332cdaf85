export { Gpt2, Session, GPT2_SMALL, type RandomConfig, type Device, type DType, type LoadOptions, type ModelInfo, type GenerationStream, type EngineStats } from './model';
export type { GenerateOptions, GenerateResult, StopReason, TokenChunk } from './generate';
export type { Timings } from './timing';
export { KvgptError, type KvgptErrorCode } from './errors';
export type { ScoreOptions, ScoreResult, ScoredToken, ScoreTimings, Logprob, TokenLogprob } from './score';
