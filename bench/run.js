// `npm run bench`: every benny suite in turn, in one process (the model loads once).
const suites = ['decode-step', 'prefill', 'generate-100', 'tokenizer'];

(async () => {
  const only = process.argv.slice(2);
  for (const name of suites) {
    if (only.length && !only.includes(name)) continue;
    await require(`./${name}.bench.js`)();
  }
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
