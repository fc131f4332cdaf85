// `npm run bench`: every benny suite in turn, in one process (the model loads once);
// `npm run bench -- prefill vs-hf` runs those named. vs-hf (kvgpt against HF transformers)
// needs Python with torch, so it runs only when named.
const suites = ['decode-step', 'prefill', 'generate-100', 'concurrency', 'tokenizer', 'vs-hf'];

(async () => {
  const only = process.argv.slice(2);
  for (const name of suites) {
    if (only.length ? !only.includes(name) : name === 'vs-hf') continue;
    await require(`./${name}.bench.js`)();
  }
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
