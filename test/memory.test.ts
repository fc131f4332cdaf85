// What loading a checkpoint costs in memory: the weights are read one tensor at a time and
// converted before the next is read, so a q8_0 load of an f32 checkpoint never holds the whole
// f32 checkpoint (nor, as a memory map once did, the file's pages besides the tensors).

import { describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync, openSync, writeSync, closeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const DIST = join(__dirname, '..', 'dist');

/** A GPT-2 checkpoint of random f32 weights in HF's layout (model.safetensors + config.json). */
function writeCheckpoint(dir: string, cfg: { n_layer: number; n_embd: number; vocab_size: number; n_positions: number }): number {
  const c = cfg.n_embd;
  const shapes: [string, number[]][] = [['wte.weight', [cfg.vocab_size, c]], ['wpe.weight', [cfg.n_positions, c]]];
  for (let i = 0; i < cfg.n_layer; i++) {
    const p = `h.${i}`;
    shapes.push(
      [`${p}.ln_1.weight`, [c]], [`${p}.ln_1.bias`, [c]],
      [`${p}.attn.c_attn.weight`, [c, 3 * c]], [`${p}.attn.c_attn.bias`, [3 * c]],
      [`${p}.attn.c_proj.weight`, [c, c]], [`${p}.attn.c_proj.bias`, [c]],
      [`${p}.ln_2.weight`, [c]], [`${p}.ln_2.bias`, [c]],
      [`${p}.mlp.c_fc.weight`, [c, 4 * c]], [`${p}.mlp.c_fc.bias`, [4 * c]],
      [`${p}.mlp.c_proj.weight`, [4 * c, c]], [`${p}.mlp.c_proj.bias`, [c]],
    );
  }
  shapes.push(['ln_f.weight', [c]], ['ln_f.bias', [c]]);
  const header: Record<string, unknown> = {};
  let offset = 0;
  for (const [name, shape] of shapes) {
    const bytes = 4 * shape.reduce((a, b) => a * b, 1);
    header[name] = { dtype: 'F32', shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  const json = Buffer.from(JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  const fd = openSync(join(dir, 'model.safetensors'), 'w');
  writeSync(fd, len);
  writeSync(fd, json);
  let seed = 1;
  for (const [, shape] of shapes) {
    const values = new Float32Array(shape.reduce((a, b) => a * b, 1));
    for (let i = 0; i < values.length; i++) values[i] = ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32 - 0.5) * 0.04;
    writeSync(fd, Buffer.from(values.buffer));
  }
  closeSync(fd);
  writeFileSync(join(dir, 'config.json'), JSON.stringify({ model_type: 'gpt2', n_ctx: cfg.n_positions, ...cfg, n_head: 8 }));
  return offset;
}

describe('memory', () => {
  it('a q8_0 load of an f32 checkpoint peaks well under the checkpoint, an f32 load near it', () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvgpt-memory-'));
    try {
      // Layers dominate (8 x 12 x 512^2 weights), as in GPT-2's larger sizes: 101 MB of f32.
      const bytes = writeCheckpoint(dir, { n_layer: 8, n_embd: 512, vocab_size: 1000, n_positions: 64 });
      const peak = (dtype: string) => {
        const script = `
          const { Gpt2 } = require(${JSON.stringify(DIST)});
          const before = process.resourceUsage().maxRSS;
          Gpt2.load(${JSON.stringify(dir)}, { dtype: '${dtype}' }).then(async (m) => {
            await m.generate([1, 2, 3], { maxNewTokens: 2 });
            console.log((process.resourceUsage().maxRSS - before) * 1024);
          });`;
        const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', env: { ...process.env, RAYON_NUM_THREADS: '2' } });
        expect(r.status, r.stderr).toBe(0);
        return Number(r.stdout.trim());
      };
      const q8 = peak('q8_0');
      const f32 = peak('f32');
      const mb = (n: number) => (n / 2 ** 20).toFixed(1);
      console.log(`load peak over the process's before: q8_0 ${mb(q8)} MB, f32 ${mb(f32)} MB, for a ${mb(bytes)} MB f32 checkpoint`);
      // q8_0 keeps 8.5 bits a weight: ~27 MB, plus one f32 tensor in flight (42 MB measured; all
      // of the f32 checkpoint read first would be over 125 MB).
      expect(q8).toBeLessThan(0.65 * bytes);
      // f32 keeps the checkpoint, plus one tensor in flight: not the file twice.
      expect(f32).toBeLessThan(1.35 * bytes);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
