// Errors as JS users get them: KvgptError with a stable `code` for everything the native core
// reports, RangeError / TypeError (also with `code`) for options, as Node's own APIs do.

export type KvgptErrorCode =
  | 'KVGPT_FILE_NOT_FOUND'
  | 'KVGPT_INVALID_FILE'
  | 'KVGPT_WEIGHTS_MISMATCH'
  | 'KVGPT_UNSUPPORTED_MODEL'
  | 'KVGPT_INVALID_MODEL_ID'
  | 'KVGPT_HUB_UNAVAILABLE'
  | 'KVGPT_TOKENIZER'
  | 'KVGPT_INVALID_INPUT'
  | 'KVGPT_OPTION_RANGE'
  | 'KVGPT_OPTION_TYPE'
  | 'KVGPT_DEVICE'
  | 'KVGPT_ABORTED'
  | 'KVGPT_DISPOSED'
  | 'KVGPT_NO_BINARY'
  | 'KVGPT_INTERNAL';

export class KvgptError extends Error {
  readonly code: KvgptErrorCode;
  constructor(code: KvgptErrorCode, message: string) {
    super(message);
    this.name = 'KvgptError';
    this.code = code;
  }
}

export type KvgptRangeError = RangeError & { code: 'KVGPT_OPTION_RANGE' };
export type KvgptTypeError = TypeError & { code: 'KVGPT_OPTION_TYPE' };

export function optionTypeError(message: string): KvgptTypeError {
  return Object.assign(new TypeError(message), { code: 'KVGPT_OPTION_TYPE' as const });
}

/** Turns an error thrown by the native binding ("KVGPT_CODE: message") into a typed error. */
export function fromNative(err: unknown): Error {
  if (!(err instanceof Error)) return new KvgptError('KVGPT_INTERNAL', String(err));
  const m = /^(KVGPT_[A-Z_]+): ([\s\S]*)$/.exec(err.message);
  if (!m) return err;
  const [, code, message] = m;
  if (code === 'KVGPT_OPTION_RANGE') {
    return Object.assign(new RangeError(message), { code });
  }
  return new KvgptError(code as KvgptErrorCode, message);
}

/** Runs `f`, rethrowing native errors as typed ones. */
export function native<T>(f: () => T): T {
  try {
    return f();
  } catch (e) {
    throw fromNative(e);
  }
}
