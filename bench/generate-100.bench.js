// Generating 100 tokens (greedy, 5-token prompt), KV cache on vs off: the seed's comparison.
const { b, loadModel, ids, suite } = require('./common');

async function main() {
  const model = await loadModel();
  const prompt = ids(5);
  const cases = [true, false].map((useCache) =>
    b.add(`generate 100 tokens, cache ${useCache ? 'on' : 'off'}`, async () => {
      const r = await model.generate(prompt, { maxNewTokens: 100, ignoreEos: true, useCache });
      if (r.tokens.length !== 100) throw new Error(`expected 100 tokens, got ${r.tokens.length}`);
    }),
  );
  return suite('generate-100', cases);
}
module.exports = main;
if (require.main === module) main();
