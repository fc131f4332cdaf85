// Scoring on a GPU through the Node API (bench/gpu/score.sh): the perplexity of a text file with
// a checkpoint directory, windows of 1024 at the strides given, in each dtype; one JSON object
// per run on stdout, the last also written to argv[2].
//   node score.js OUT.json MODEL_DIR TEXT_FILE [strides=1024,512] [dtypes=f32,f16]
const fs = require('node:fs');
const { Gpt2 } = require('../../dist');

(async () => {
  const [out, dir, file, strides = '1024,512', dtypes = 'f32,f16'] = process.argv.slice(2);
  const text = fs.readFileSync(file, 'utf8');
  const rows = [];
  for (const dtype of dtypes.split(',')) {
    const model = await Gpt2.load(dir, { device: 'cuda', dtype, prefillChunk: 1024 });
    await model.score(text.slice(0, 4000), { maxLength: 1024 }); // warm-up
    for (const stride of strides.split(',').map(Number)) {
      const t0 = performance.now();
      const r = await model.score(text, { maxLength: 1024, stride });
      const seconds = (performance.now() - t0) / 1000;
      const row = { engine: 'kvgpt', device: model.info.device, dtype, stride, tokens: r.ids.length, scored: r.scored, windows: r.windows, nll: r.nll, perplexity: r.perplexity, seconds, tokensPerSecond: r.ids.length / seconds, forwardMs: r.timings.forwardMs, logprobMs: r.timings.logprobMs };
      console.log(JSON.stringify(row));
      rows.push(row);
    }
    model.dispose();
  }
  fs.writeFileSync(out, JSON.stringify(rows, null, 2));
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
