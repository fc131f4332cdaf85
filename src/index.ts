export { Gpt2, type Device, type LoadOptions, type ModelInfo, type GenerationStream } from './model';
export type { GenerateOptions, GenerateResult, StopReason, TokenChunk } from './generate';
export type { Timings } from './timing';
export { KvgptError, type KvgptErrorCode } from './errors';
