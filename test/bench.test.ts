import { describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { TINY } from './helpers';

const CLI = join(__dirname, '..', 'dist', 'cli.js');

function bench(...args: string[]) {
  const r = spawnSync(process.execPath, [CLI, 'bench', '--no-progress', ...args], { encoding: 'utf8' });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('kvgpt bench on the tiny fixture', () => {
  const out = mkdtempSync(join(tmpdir(), 'kvgpt-bench-'));

  it('writes well-formed JSON, SVG and PNG, and prints the table', () => {
    const r = bench('--model', TINY, '--lengths', '10,30', '--repetitions', '2', '--png', '--out', out);
    expect(r.code, r.stderr).toBe(0);
    const result = JSON.parse(readFileSync(join(out, 'kvgpt-bench.json'), 'utf8'));
    expect(result).toMatchObject({ tool: 'kvgpt', device: 'cpu', dtype: 'f32', promptTokens: 5, config: { n_layer: 2, n_embd: 32 } });
    expect(result.runs).toHaveLength(4);
    for (const run of result.runs) {
      expect(run.seconds).toHaveLength(2);
      expect(run.newTokens).toBe(run.length - 5);
      expect(run.medianSeconds).toBeGreaterThan(0);
      expect(run.msPerToken).toBeCloseTo((run.medianSeconds * 1000) / run.newTokens, 6);
      // The allocated cache is exactly the seed's formula at L positions (none with the cache off).
      expect(run.cacheBytes).toBe(run.cache ? 2 * 2 * 32 * run.length * 4 : 0);
      expect(run.cacheBytesFormula).toBe(run.cacheBytes);
      // Cache-on rows are also a multiple of the bandwidth floor measured in the same run.
      if (run.cache) expect(run.ofBandwidthFloor).toBeCloseTo(run.msPerToken / result.bandwidth.floorMsPerToken, 6);
      else expect(run.ofBandwidthFloor).toBeUndefined();
    }
    // The triad's bandwidth, the weights' bytes (2 layers x 32 wide: 4 bytes a parameter) and the floor.
    expect(result.bandwidth.bytesPerSecond).toBeGreaterThan(1e8);
    expect(result.bandwidth.weightBytes).toBe(4 * (1_637_792 - 128 * 32)); // every weight but wpe's other rows
    expect(result.bandwidth.floorMsPerToken).toBeCloseTo((result.bandwidth.weightBytes / result.bandwidth.bytesPerSecond) * 1000, 9);
    expect(r.stderr).toMatch(/memory bandwidth [\d.]+ GB\/s \(STREAM triad/);
    expect(r.stdout).toMatch(/x floor = cache-on ms\/token over the bandwidth floor/);
    for (const chart of ['total-time', 'per-token']) {
      const svg = readFileSync(join(out, `${chart}.svg`), 'utf8');
      expect(svg.startsWith('<svg')).toBe(true);
      expect(svg.trimEnd().endsWith('</svg>')).toBe(true);
      expect(svg).toContain('kvgpt, cache on');
      const png = readFileSync(join(out, `${chart}.png`));
      expect(png.subarray(1, 4).toString()).toBe('PNG');
    }
    expect(r.stdout).toMatch(/^\s*L\s+off s\s+article\s+on s\s+article/);
    expect(r.stdout).toMatch(/\n\s*10\s+[\d.]+\s+0\.17\s+[\d.]+\s+0\.18/);
  });

  it('--compare prints kvgpt/HF ratios from a results file of the same shape', () => {
    const mine = JSON.parse(readFileSync(join(out, 'kvgpt-bench.json'), 'utf8'));
    const hf = { ...mine, tool: 'hf-transformers', model: 'fake', runs: mine.runs.map((x: { medianSeconds: number }) => ({ ...x, medianSeconds: x.medianSeconds * 4 })) };
    const hfPath = join(out, 'hf.json');
    writeFileSync(hfPath, JSON.stringify(hf));
    const r = bench('--model', TINY, '--lengths', '10,30', '--out', join(out, 'again'), '--compare', hfPath);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain('off ratio');
    expect(r.stdout).toMatch(/ratio = kvgpt \/ HF/);
    rmSync(out, { recursive: true, force: true });
  });

  it('rejects lengths outside the context and bad flags', () => {
    const r = bench('--model', TINY, '--lengths', '10,500', '--out', join(tmpdir(), 'unused'));
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/lengths must be in \(5, 128\]/);
    expect(bench('--model', TINY, '--cache', 'maybe').stderr).toMatch(/--cache must be on, off or both/);
    expect(bench('--model', TINY, '--dtype', 'f64').stderr).toMatch(/dtype must be 'f32'/);
  });

  it('--concurrency measures the engine: tokens/s per level, percentiles, JSON and chart', () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvgpt-tp-'));
    const r = bench('--model', TINY, '--concurrency', '1,3', '--prompt-tokens', '8', '--new-tokens', '6', '--repetitions', '2', '--out', dir);
    expect(r.code, r.stderr).toBe(0);
    const result = JSON.parse(readFileSync(join(dir, 'kvgpt-throughput.json'), 'utf8'));
    expect(result).toMatchObject({ tool: 'kvgpt', promptTokens: 8, newTokens: 6, engine: { maxSequences: 3 } });
    expect(result.runs.map((x: { concurrency: number }) => x.concurrency)).toEqual([1, 3]);
    for (const run of result.runs) {
      expect(run.seconds).toHaveLength(2);
      expect(run.tokensPerSecond).toBeCloseTo((run.concurrency * 6) / run.medianSeconds, 6);
      expect(run.ttftMs.p50).toBeLessThanOrEqual(run.ttftMs.p99);
      expect(run.tokenMs.p50).toBeGreaterThan(0);
    }
    expect(result.runs[0].ofOne).toBe(1);
    // Three at once ride the same passes: alone they would take 3 x 6 = 18 passes (a prefill and
    // 5 decode steps each), together 6 when all three arrive before the first pass. The engine
    // may start a pass before the last call reaches it (on a loaded CI machine the submitting
    // thread can lose its core between calls), so allow a few more than 6, and check that the
    // mean batch is the 18 sequence-passes spread over the passes taken.
    const three = result.runs[1];
    expect(three.steps).toBeGreaterThanOrEqual(6);
    expect(three.steps).toBeLessThanOrEqual(12);
    expect(three.meanBatchSize).toBeCloseTo(18 / three.steps, 6);
    expect(readFileSync(join(dir, 'throughput.svg'), 'utf8')).toContain('concurrent sequences');
    expect(r.stdout).toMatch(/^\s*concurrency\s+tokens\/s\s+x c=1/);
    expect(bench('--model', TINY, '--concurrency', '2', '--prompt-tokens', '100', '--new-tokens', '40').stderr).toMatch(/must fit in n_positions \(128\)/);
    rmSync(dir, { recursive: true, force: true });
  });
});
