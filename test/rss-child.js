// Run by load.test.ts in its own process (node --expose-gc): 1,000 generations in a row on
// one model, mixing generate, stream, cache off, stop strings and aborts, and RSS after a full
// GC at generation 50, every 100th, and 1,000. Prints one JSON line.
const { Gpt2 } = require('../dist');

const [dir, count = '1000'] = process.argv.slice(2);

async function main() {
  const model = await Gpt2.load(dir);
  const prompts = ['Hello, my dog is cute', 'The KV cache stores keys and values', '明天降温了', '', 'x\uD800\0y'];
  const rss = {};
  const sample = (i) => {
    global.gc();
    rss[i] = process.memoryUsage().rss;
  };
  for (let i = 1; i <= Number(count); i++) {
    const prompt = prompts[i % prompts.length];
    const opts = { maxNewTokens: 12, ignoreEos: true };
    switch (i % 4) {
      case 0: {
        const s = model.stream(prompt, opts);
        for await (const _ of s);
        await s.result;
        break;
      }
      case 1:
        await model.generate(prompt, { ...opts, useCache: false, stop: ['zz'] });
        break;
      case 2: {
        const s = model.stream(prompt, { ...opts, maxNewTokens: 40 });
        let n = 0;
        for await (const _ of s) if (++n === 3) break; // aborts the native generation
        await s.result;
        break;
      }
      default:
        await model.generate(prompt, { ...opts, temperature: 0.8, seed: i });
    }
    if (i === 50 || i % 100 === 0) sample(i);
  }
  model.dispose();
  console.log(JSON.stringify({ rss }));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
