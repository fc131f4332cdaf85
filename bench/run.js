// `npm run bench`: every benny suite in turn, in one process (the model loads once);
// `npm run bench -- prefill vs-hf` runs those named. The vs-hf suites (kvgpt against
// HF transformers) need Python with torch, so they run only when named.
const suites = ['decode-step', 'prefill', 'generate-100', 'concurrency', 'tokenizer', 'serve-load', 'vs-hf', 'vs-hf-throughput', 'vs-hf-perplexity'];

(async () => {
  const only = process.argv.slice(2);
  for (const name of suites) {
    if (only.length ? !only.includes(name) : name.startsWith('vs-hf')) continue;
    await require(`./${name}.bench.js`)();
  }
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
