// `kvgpt serve` soak: 20,000 requests against a server in a child process (test/serve-child.js,
// the tiny fixture), 16 clients at a time, streamed and not, greedy and sampled, some with
// logprobs; the server's RSS read every 1,000 requests after a garbage collection.
import { describe, expect, it } from 'vitest';
import { fork, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { TINY } from './helpers';

const TOTAL = Number(process.env.KVGPT_SOAK ?? 20000);
// RSS climbs for the first few thousand requests (V8 sizes its heap, the allocators their
// arenas) and settles; the bound holds over the second half. Measured 2026-12-02 (after a GC):
// 158.4 MB at 6,000, 162.2 at 10,000, 163.3 at 20,000, the V8 heap flat at 11.0-11.1 MB.
const WARMUP = TOTAL / 2;

function ask(child: ChildProcess): Promise<{ rss: number; heapUsed: number }> {
  return new Promise((resolve) => {
    child.once('message', (m) => resolve(m as { rss: number; heapUsed: number }));
    child.send('rss');
  });
}

describe('kvgpt serve soak', () => {
  it(`answers ${TOTAL} requests without errors, and its RSS after warm-up grows by less than 5 MB`, async () => {
    const child = fork(join(__dirname, 'serve-child.js'), [TINY], { execArgv: ['--expose-gc'] });
    try {
      const url = await new Promise<string>((resolve, reject) => {
        child.once('message', (m) => resolve((m as { url: string }).url));
        child.once('exit', (code) => reject(new Error(`the server exited with ${code}`)));
      });
      let done = 0;
      let errors = 0;
      const samples: [number, number, number][] = [];
      const one = async (i: number) => {
        const stream = i % 2 === 0;
        const r = await fetch(`${url}/v1/completions`, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ prompt: `request ${i}: Hello, my dog`, max_tokens: 4 + (i % 5), temperature: i % 3 === 0 ? 0 : 0.8, seed: i, stream, ...(i % 7 === 0 ? { logprobs: 2 } : {}) }),
        });
        const body = await r.text();
        if (r.status !== 200 || (stream ? !body.endsWith('data: [DONE]\n\n') : !JSON.parse(body).choices)) errors++;
      };
      let next = 0;
      const worker = async () => {
        while (next < TOTAL) {
          const i = next++;
          await one(i);
          done++;
          if (done % 1000 === 0) {
            const m = await ask(child);
            samples.push([done, m.rss, m.heapUsed]);
          }
        }
      };
      await Promise.all(Array.from({ length: 16 }, worker));
      expect(errors).toBe(0);
      const settled = samples.filter(([n]) => n >= WARMUP);
      const [first, last] = [settled[0], settled[settled.length - 1]];
      const growth = (last[1] - first[1]) / 2 ** 20;
      const heapGrowth = (last[2] - first[2]) / 2 ** 20;
      const mb = (b: number) => (b / 2 ** 20).toFixed(1);
      console.log(`soak: RSS ${mb(first[1])} MB at ${first[0]} requests, ${mb(last[1])} MB at ${last[0]} (+${growth.toFixed(1)} MB); samples (requests: RSS / V8 heap used, MB) ${samples.map(([n, r, h]) => `${n}: ${mb(r)} / ${mb(h)}`).join(', ')}`);
      expect(growth).toBeLessThan(5);
      expect(heapGrowth).toBeLessThan(1);
    } finally {
      child.disconnect();
    }
  }, 600_000);
});
