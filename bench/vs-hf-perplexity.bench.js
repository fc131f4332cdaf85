// Issue 13's speed row: the perplexity of a ~100,000-token text with GPT-2 small's shapes (seeded
// random weights, written once by HF's save_pretrained so both read the same checkpoint), kvgpt's
// `kvgpt perplexity --json` against the loop of HF's perplexity guide (float32, CPU,
// torch.inference_mode, 2 threads for both), windows of 1024 at strides 1024 and 512, the two
// taking turns. Prints seconds, tokens/s and the ratio, and the two perplexities (the same
// weights: they must agree); saves bench/results/vs-hf-perplexity.json.
// Needs Python with torch and transformers (KVGPT_HF_PYTHON, default .venv-hf/bin/python);
// `npm run bench -- vs-hf-perplexity`. KVGPT_PPL_TOKENS (default 100000) and KVGPT_PPL_STRIDES
// (default 1024,512) shorten it.
const fs = require('node:fs');
const path = require('node:path');
const crypto = require('node:crypto');
const { execFileSync } = require('node:child_process');
const { RESULTS } = require('./common');
const { Gpt2 } = require('../dist');

const ROOT = path.join(__dirname, '..');
const TOKENS = Number(process.env.KVGPT_PPL_TOKENS ?? 100000);
const STRIDES = (process.env.KVGPT_PPL_STRIDES ?? '1024,512').split(',').map(Number);
const PYTHON = process.env.KVGPT_HF_PYTHON ?? path.join(ROOT, '.venv-hf/bin/python');
const HF = path.join(__dirname, 'hf', 'hf_perplexity.py');

/** The project's own prose, repeated until it is at least `tokens` tokens long. */
async function makeText(model, file, tokens) {
  const parts = ['README.md', 'bench/NOTES.md', 'bench/gpu/NOTES.md', 'test/fixtures/sliding/text.txt'].map((f) => fs.readFileSync(path.join(ROOT, f), 'utf8'));
  const corpus = parts.join('\n\n');
  const per = model.tokenize(corpus).length;
  let text = Array.from({ length: Math.ceil(tokens / per) }, () => corpus).join('\n\n');
  // Trim whole lines from the end while it stays at least `tokens` long (up to one corpus's worth).
  const lines = text.split('\n');
  let lo = 0;
  let hi = lines.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (model.tokenize(lines.slice(0, mid).join('\n')).length >= tokens) hi = mid;
    else lo = mid + 1;
  }
  text = lines.slice(0, lo).join('\n');
  fs.writeFileSync(file, text);
  return text;
}

function kvgpt(dir, file, stride) {
  const out = execFileSync(process.execPath, [path.join(ROOT, 'dist/cli.js'), 'perplexity', '-m', dir, '--max-length', '1024', '--stride', String(stride), '--json', '--no-progress', file], {
    env: { ...process.env, RAYON_NUM_THREADS: '2' },
    encoding: 'utf8',
  });
  return JSON.parse(out);
}

function hf(dir, file, stride) {
  const out = execFileSync(PYTHON, [HF, 'run', dir, file, '--max-length', '1024', '--stride', String(stride), '--threads', '2'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] });
  return JSON.parse(out);
}

async function main() {
  fs.mkdirSync(RESULTS, { recursive: true });
  const dir = path.join(RESULTS, 'gpt2-small-random');
  if (!fs.existsSync(path.join(dir, 'model.safetensors'))) {
    console.log(`writing GPT-2 small with seeded random weights to ${dir}`);
    execFileSync(PYTHON, [HF, 'make-model', dir], { stdio: 'inherit' });
  }
  const file = path.join(RESULTS, 'perplexity-text.txt');
  const model = await Gpt2.load(dir);
  const text = await makeText(model, file, TOKENS);
  const sha = crypto.createHash('sha256').update(text).digest('hex').slice(0, 16);
  model.dispose();
  console.log(`text: ${file}, ${text.length} characters, sha256 ${sha}`);
  const rows = [];
  for (const stride of STRIDES) {
    const k = kvgpt(dir, file, stride);
    const seconds = k.seconds;
    console.log(`kvgpt  stride ${stride}: ${seconds.toFixed(1)} s, ${(k.tokens / seconds).toFixed(0)} tokens/s, perplexity ${k.perplexity.toFixed(4)} (${k.tokens} tokens, ${k.windows} windows)`);
    const h = hf(dir, file, stride);
    console.log(`HF     stride ${stride}: ${h.seconds.toFixed(1)} s, ${(h.tokens / h.seconds).toFixed(0)} tokens/s, perplexity ${h.perplexity.toFixed(4)} (${h.tokens} tokens, ${h.windows} windows)`);
    const ratio = h.seconds / seconds;
    const rel = Math.abs(k.nll - h.nll) / h.nll;
    console.log(`  kvgpt is ${ratio.toFixed(2)}x HF's speed; |nll difference| / nll = ${rel.toExponential(2)}`);
    rows.push({ stride, kvgpt: k, hf: h, speedup: ratio, nllRelDiff: rel });
  }
  fs.writeFileSync(path.join(RESULTS, 'vs-hf-perplexity.json'), JSON.stringify({ date: new Date().toISOString(), tokens: TOKENS, textSha256: sha, rows }, null, 2));
}
module.exports = main;
if (require.main === module) main().catch((e) => { console.error(e); process.exit(1); });
