// Loads the native addon through napi-rs's generated loader (index.js, which also honours
// NAPI_RS_NATIVE_LIBRARY_PATH), and turns a failure into an error that names the platform,
// the package it looked for, and what to do.

import { KvgptError } from './errors';

type Binding = typeof import('../index.js');

/** The first line of what a failed require threw. */
function loaderMessage(e: unknown): string {
  return e instanceof Error ? e.message.split('\n')[0] : String(e);
}

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
    const detail = loaderMessage(e);
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

/**
 * The CUDA build of the addon, a separate artifact (a CPU-only install never loads it, so never
 * needs CUDA libraries). Looked for, in order: the file KVGPT_CUDA_BINARY names, the package
 * kvgpt-<platform>-cuda, ./kvgpt.<platform>.cuda.node beside the package. Returns the binding,
 * or why it could not be loaded, in words that say what is missing (binary, driver, library).
 */
export function requireCudaBinding(): { binding: Binding } | { missing: string } {
  const name = platformName();
  const explicit = process.env.KVGPT_CUDA_BINARY;
  const candidates = explicit ? [explicit] : [`kvgpt-${name}-cuda`, `../kvgpt.${name}.cuda.node`];
  const failures: string[] = [];
  for (const candidate of candidates) {
    try {
      const binding = require(candidate) as Binding;
      if (typeof binding?.loadModel !== 'function') return { missing: `${candidate} is not a kvgpt addon (it has no loadModel)` };
      return { binding };
    } catch (e) {
      const detail = loaderMessage(e);
      // Not there at all (try the next place), as against there but failing to load.
      const notThere = (e as NodeJS.ErrnoException)?.code === 'MODULE_NOT_FOUND' && !/\.so[\d.]*: cannot open/.test(detail);
      if (!notThere) return { missing: cudaLoadFailure(candidate, detail) };
      failures.push(candidate);
    }
  }
  return {
    missing:
      `the CUDA build of kvgpt is not installed (looked for ${failures.join(', ')}): ` +
      (name === 'linux-x64-gnu'
        ? `npm install kvgpt brings it on ${name} as the optional dependency kvgpt-${name}-cuda (reinstall without --omit=optional), `
        : `there is no prebuilt one for ${name}; `) +
      `or build it with scripts/build-cuda.sh and set KVGPT_CUDA_BINARY to the .node file it writes`,
  };
}

/** What a failed dlopen of the CUDA addon means for the user. */
export function cudaLoadFailure(file: string, detail: string): string {
  const lib = /(lib[\w.+-]+\.so[\d.]*): cannot open shared object file/.exec(detail)?.[1];
  if (lib?.startsWith('libcuda.so')) {
    return `no NVIDIA driver on this machine: ${lib} (installed with the driver, CUDA 13 needs >= 580) could not be loaded by ${file}`;
  }
  if (lib) {
    return `the CUDA 13 library ${lib} was not found: add the folder holding it (/usr/local/cuda/lib64, or pip's nvidia/cu13/lib) to LD_LIBRARY_PATH; loading ${file} said: ${detail}`;
  }
  return `the CUDA build ${file} could not be loaded: ${detail}`;
}
