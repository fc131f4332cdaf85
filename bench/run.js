// `npm run bench`: every benny suite in turn, in one process (the model loads once);
// `npm run bench -- prefill vs-hf` runs those named. The vs- suites (kvgpt against HF
// transformers, which needs Python with torch, and against the Node peers, which need
// bench/peers/setup.sh) run only when named.
const suites = ['decode-step', 'prefill', 'generate-100', 'concurrency', 'tokenizer', 'serve-load', 'vs-hf', 'vs-hf-throughput', 'vs-hf-perplexity', 'vs-peers'];

(async () => {
  const only = process.argv.slice(2);
  for (const name of suites) {
    if (only.length ? !only.includes(name) : name.startsWith('vs-')) continue;
    await require(`./${name}.bench.js`)();
  }
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
