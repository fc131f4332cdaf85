import { afterEach, describe, expect, it } from 'vitest';
import { writeFileSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Gpt2, KvgptError } from '../src';
import { cudaLoadFailure } from '../src/binding';
import { reference, TINY } from './helpers';

// Device selection and dtypes through the API. CI has no GPU and no CUDA build, so 'cuda' must
// fail with what is missing and 'auto' must fall back to the CPU; the GPU side is checked by
// bench/gpu/run.sh on an H200.
describe('device and dtype', () => {
  const saved = process.env.KVGPT_CUDA_BINARY;
  afterEach(() => {
    if (saved === undefined) delete process.env.KVGPT_CUDA_BINARY;
    else process.env.KVGPT_CUDA_BINARY = saved;
  });

  it("'cuda' without the CUDA build says it is not installed; 'auto' takes the CPU", async () => {
    process.env.KVGPT_CUDA_BINARY = join(tmpdir(), 'no-such-kvgpt.cuda.node');
    const err = await Gpt2.load(TINY, { device: 'cuda' }).catch((e) => e);
    expect(err).toBeInstanceOf(KvgptError);
    expect(err.code).toBe('KVGPT_DEVICE');
    expect(err.message).toMatch(/the CUDA build of kvgpt is not installed .*no-such-kvgpt\.cuda\.node.*scripts\/build-cuda\.sh/);
    expect(err.message).toMatch(/optional dependency kvgpt-linux-x64-gnu-cuda/);
    const auto = await Gpt2.load(TINY, { device: 'auto' });
    expect(auto.info.device).toBe('cpu');
    const r = reference(TINY).prompts[0];
    expect((await auto.generate(r.input_ids, { maxNewTokens: 10, ignoreEos: true })).tokens).toEqual(r.greedy_new_ids.slice(0, 10));
    auto.dispose();
  });

  it('a KVGPT_CUDA_BINARY that is not a kvgpt addon is a device error, not a crash', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvgpt-device-'));
    const notJs = join(dir, 'broken.node');
    writeFileSync(notJs, 'this is not a shared object');
    process.env.KVGPT_CUDA_BINARY = notJs;
    const err = await Gpt2.random({ n_layer: 1 }, { device: 'cuda' }).catch((e) => e);
    expect(err).toMatchObject({ code: 'KVGPT_DEVICE' });
    expect(err.message).toMatch(/broken\.node could not be loaded/);
    const json = join(dir, 'module.json');
    writeFileSync(json, '{}');
    process.env.KVGPT_CUDA_BINARY = json;
    const notAddon = await Gpt2.load(TINY, { device: 'cuda' }).catch((e) => e);
    expect(notAddon.message).toMatch(/module\.json is not a kvgpt addon/);
  });

  it('names the missing driver or library from the loader message', () => {
    expect(cudaLoadFailure('x.node', 'libcuda.so.1: cannot open shared object file: No such file or directory')).toMatch(/no NVIDIA driver on this machine: libcuda\.so\.1/);
    expect(cudaLoadFailure('x.node', 'libcublas.so.13: cannot open shared object file: No such file or directory')).toMatch(/the CUDA 13 library libcublas\.so\.13 was not found: add the folder holding it .* to LD_LIBRARY_PATH/);
  });

  it.each(['f32', 'f16', 'bf16', 'q8_0'] as const)('dtype %s loads, reports itself and generates', async (dtype) => {
    const model = await Gpt2.load(TINY, { dtype });
    expect(model.info.dtype).toBe(dtype);
    // On the CPU f32 weights keep an f32 cache, the others an f16 one (beside f32 activations).
    expect(model.info.cacheBytesPerToken).toBe(2 * 2 * 32 * (dtype === 'f32' ? 4 : 2));
    // Bytes a step reads: 4 a weight in f32, 2 in f16/bf16, 36/32 (int8 + an f32 scale per 32)
    // in q8_0 for the linear layers, whose biases and the layer norms stay f32.
    const f32Bytes = 4 * (model.info.parameterCount - 128 * 32);
    const ratio = model.info.stepWeightBytes / f32Bytes;
    expect(ratio).toBeCloseTo({ f32: 1, f16: 0.5, bf16: 0.5, q8_0: 0.28 }[dtype], 2);
    const r = reference(TINY).prompts[0];
    const g = await model.generate(r.input_ids, { maxNewTokens: 5, ignoreEos: true });
    // Prompt 0's first 5 greedy ids survive every dtype (parity.rs bounds the rest).
    expect(g.tokens).toEqual(r.greedy_new_ids.slice(0, 5));
    model.dispose();
  });

  it('a bad dtype is a RangeError naming the choices; a non-string one a TypeError', async () => {
    const range = await Gpt2.load(TINY, { dtype: 'f64' as never }).catch((e) => e);
    expect(range).toBeInstanceOf(RangeError);
    expect(range.message).toMatch(/'f32', 'f16', 'bf16' or 'q8_0', got "f64"/);
    const type = await Gpt2.random({ n_layer: 1 }, { dtype: 16 as never }).catch((e) => e);
    expect(type).toBeInstanceOf(TypeError);
    expect(type.code).toBe('KVGPT_OPTION_TYPE');
  });
});
