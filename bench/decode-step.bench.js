// One decode step (a one-token forward over the KV cache + argmax) at context 16, 256, 512, 1000.
const { b, loadModel, ids, serial, suite } = require('./common');

async function main() {
  const model = await loadModel();
  const cases = [];
  for (const ctx of [16, 256, 512, 1000]) {
    const session = model.session({ capacity: ctx + 1 });
    await session.feed(ids(ctx)); // the prefill, outside the timed function
    cases.push(
      b.add(
        `decode step at context ${ctx}`,
        serial(async () => {
          session.truncate(ctx); // back to ctx filled positions: every sample is the same step
          await session.feed([464]);
        }),
      ),
    );
  }
  return suite('decode-step', cases);
}
module.exports = main;
if (require.main === module) main();
