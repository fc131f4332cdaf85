// Prefill: one forward pass over a prompt of 16, 128, 512 tokens into a fresh KV cache.
const { b, loadModel, ids, serial, suite } = require('./common');

async function main() {
  const model = await loadModel();
  const cases = [16, 128, 512].map((n) => {
    const prompt = ids(n);
    const session = model.session({ capacity: n });
    return b.add(
      `prefill ${n} tokens`,
      serial(async () => {
        session.truncate(0);
        await session.feed(prompt);
      }),
    );
  });
  return suite('prefill', cases);
}
module.exports = main;
if (require.main === module) main();
