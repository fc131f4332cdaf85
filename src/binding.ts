// Loads the native addon through napi-rs's generated loader (index.js, which also honours
// NAPI_RS_NATIVE_LIBRARY_PATH), and turns a failure into an error that names the platform,
// the package it looked for, and what to do.

import { KvgptError } from './errors';

type Binding = typeof import('../index.js');

/** The napi-rs platform name of this process: linux-x64-gnu, darwin-arm64, win32-x64-msvc, ... */
export function platformName(): string {
  const { platform, arch } = process;
  if (platform === 'linux') {
    const report = process.report?.getReport() as { header?: { glibcVersionRuntime?: string } } | undefined;
    return `linux-${arch}-${report?.header?.glibcVersionRuntime ? 'gnu' : 'musl'}`;
  }
  if (platform === 'win32') return `win32-${arch}-msvc`;
  return `${platform}-${arch}`;
}

export function requireBinding(): Binding {
  try {
    return require('../index.js') as Binding;
  } catch (e) {
    const name = platformName();
    const detail = e instanceof Error ? e.message.split('\n')[0] : String(e);
    const override = process.env.NAPI_RS_NATIVE_LIBRARY_PATH;
    throw new KvgptError(
      'KVGPT_NO_BINARY',
      override
        ? `NAPI_RS_NATIVE_LIBRARY_PATH is set to ${override}, which could not be loaded as the kvgpt addon (${detail}); unset it or point it at a kvgpt .node file`
        : `no kvgpt native binary for this platform (${name}): looked for the package kvgpt-${name} (an optional dependency of kvgpt) and ./kvgpt.${name}.node. ` +
          `Reinstall kvgpt with optional dependencies (not --omit=optional / --no-optional), or on another platform build from source ` +
          `(Rust via rustup, then npm run build in a clone). Loader said: ${detail}`,
    );
  }
}
