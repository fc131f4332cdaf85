// Concurrency: c generations at once (32-token prompts, 32 new tokens each, greedy), batched by
// the engine, for c = 1, 4, 16. Each case reports calls/s; generated tokens/s is that times
// 32 c, printed at the end with each case as a multiple of c = 1.
const { b, loadModel, ids, serial, suite } = require('./common');

const NEW = 32;
const LEVELS = [1, 4, 16];

async function main() {
  const model = await loadModel();
  const prompts = Array.from({ length: Math.max(...LEVELS) }, (_, i) => ids(32 + i).slice(i));
  const opts = { maxNewTokens: NEW, ignoreEos: true };
  const cases = LEVELS.map((c) =>
    b.add(
      `${c} concurrent generations of ${NEW} tokens`,
      serial(async () => {
        const rs = await Promise.all(prompts.slice(0, c).map((p) => model.generate(p, opts)));
        if (rs.some((r) => r.tokens.length !== NEW)) throw new Error('a generation stopped early');
      }),
    ),
  );
  return suite('concurrency', cases, (summary) => {
    const rate = summary.results.map((r, i) => r.ops * NEW * LEVELS[i]);
    const lines = rate.map((t, i) => `  ${LEVELS[i]} at once: ${t.toFixed(1)} generated tokens/s (${(t / rate[0]).toFixed(2)}x one)`);
    console.log(`generated tokens/s:\n${lines.join('\n')}`);
  });
}
module.exports = main;
if (require.main === module) main();
