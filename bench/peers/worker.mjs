// One engine at one precision, in a process of its own (so its load time and peak RSS are its
// own): `node worker.mjs kvgpt|llama|tjs f32|f16|q8_0 [seqs]`. Prints one JSON line.
// Default mode: loadMs, decode (context -> median ms a token over STEPS one-token steps, the
// prompt of `context` tokens read in one pass first), prefillMs (median time to the first token
// of a PREFILL-token prompt, over 3), peakRssMB, and greedy: the first 8 greedy ids after a
// fixed 64-token prompt (one whose greedy ids change along the way: random weights tend to
// repeat one token), so that the bench can say whether the engines agree on the weights.
// `seqs` mode: SEQS sequences generated at once (each a SEQ_PROMPT-token prompt of ids of its
// own, SEQ_NEW new tokens, greedy), as the engine batches them: wallMs (from the first call to
// the last token), tokensPerSec (SEQS x SEQ_NEW over wallMs), greedy (each sequence's first 8 ids).
// Timed as a Node user sees it: between tokens arriving in JS, for every engine. Greedy, EOS
// ignored, 2 threads, the same weights (bench/peers/setup.sh) and the same token ids.
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const here = path.dirname(fileURLToPath(import.meta.url));
const work = process.env.KVGPT_PEERS_WORK ?? path.join(here, 'work');
const [engine, precision, mode = 'decode'] = process.argv.slice(2);
const CONTEXTS = (process.env.KVGPT_BENCH_CONTEXTS ?? '16,256,512,1000').split(',').map(Number);
const STEPS = Number(process.env.KVGPT_PEERS_STEPS ?? 20);
const PREFILL = 512;
const SEQS = Number(process.env.KVGPT_PEERS_SEQS ?? 16);
const SEQ_PROMPT = 32;
const SEQ_NEW = 32;
// bench/common.js's ids, written again: that module loads kvgpt, whose addon would count in
// the peers' peak RSS. `offset` gives each of the concurrent sequences a prompt of its own.
const ids = (n, offset = 0) => Array.from({ length: n }, (_, i) => ((i + offset) * 4099 + 13) % 50257);
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)];
const GREEDY_PROMPT = ids(64, 333);
const GREEDY_IDS = 8;

/**
 * Each engine as the same calls: load (for `seqs` sequences at once), then `run(prompt, n)` ->
 * { times: arrival of each of n tokens (ms from the call), ids }, and `batch(prompts, n)` -> the
 * ids of each sequence, all generated at once.
 */
const engines = {
  async kvgpt() {
    const { Gpt2 } = createRequire(import.meta.url)('../../dist');
    // The whole prompt in one forward pass, as the others read it; up to 32 sequences at once
    // (the CPU's default maxSequences), batched by kvgpt's engine.
    const model = await Gpt2.load(path.join(work, 'gpt2-small-random'), { dtype: precision, prefillChunk: 1024, maxStepTokens: 1024 });
    const options = (n) => ({ maxNewTokens: n, temperature: 0, ignoreEos: true });
    return {
      async run(prompt, n) {
        const times = [];
        const out = [];
        const t0 = performance.now();
        for await (const { token } of model.stream(prompt, options(n))) {
          times.push(performance.now() - t0);
          out.push(token);
        }
        return { times, ids: out };
      },
      batch: async (prompts, n) => (await Promise.all(prompts.map((p) => model.generate(p, options(n))))).map((r) => r.tokens),
    };
  },
  async llama(seqs) {
    const { getLlama, LlamaLogLevel } = await import(path.join(here, 'node_modules/node-llama-cpp/dist/index.js'));
    const llama = await getLlama({ gpu: false, build: 'never', maxThreads: 2, logLevel: LlamaLogLevel.error });
    const model = await llama.loadModel({ modelPath: path.join(work, `gpt2-small-random-${precision}.gguf`) });
    // One context; with `sequences` > 1 each sequence gets contextSize cells of its own and
    // node-llama-cpp evaluates the sequences' queued tokens together in one batch.
    const context = await model.createContext(
      seqs === 1
        ? { contextSize: 1024, batchSize: 1024, threads: 2, sequences: 1 }
        : { contextSize: SEQ_PROMPT + SEQ_NEW, batchSize: seqs * SEQ_PROMPT, threads: 2, sequences: seqs },
    );
    const sequences = Array.from({ length: seqs }, () => context.getSequence());
    const generate = async (seq, prompt, n, times) => {
      await seq.clearHistory();
      const out = [];
      const t0 = performance.now();
      for await (const token of seq.evaluate(prompt, { temperature: 0 })) {
        times?.push(performance.now() - t0);
        out.push(token);
        if (out.length === n) break;
      }
      return out;
    };
    return {
      async run(prompt, n) {
        const times = [];
        return { ids: await generate(sequences[0], prompt, n, times), times };
      },
      batch: (prompts, n) => Promise.all(prompts.map((p, i) => generate(sequences[i], p, n))),
    };
  },
  async tjs() {
    const { AutoModelForCausalLM, BaseStreamer, Tensor, env } = await import(path.join(here, 'node_modules/@huggingface/transformers/dist/transformers.node.mjs'));
    env.allowRemoteModels = false; // the local ONNX export only, never the hub
    env.allowLocalModels = true;
    env.useFSCache = false;
    const model = await AutoModelForCausalLM.from_pretrained(path.join(work, 'gpt2-small-random-onnx'), {
      dtype: { f32: 'fp32', f16: 'fp16', q8_0: 'q8' }[precision], // onnx/model.onnx, model_fp16.onnx, model_quantized.onnx
      device: 'cpu',
      local_files_only: true,
      // Passed through to onnxruntime-node's InferenceSession.create.
      session_options: { intraOpNumThreads: 2, interOpNumThreads: 1 },
    });
    // Each put() after the first (which is the prompt) is one new token for every sequence.
    class Arrivals extends BaseStreamer {
      constructor(t0) {
        super();
        Object.assign(this, { t0, prompt: true, times: [], ids: [] });
      }
      put(value) {
        if (this.prompt) this.prompt = false;
        else {
          this.times.push(performance.now() - this.t0);
          this.ids.push(value.map((v) => Number(v[0])));
        }
      }
      end() {}
    }
    const generate = async (prompts, n) => {
      const [b, p] = [prompts.length, prompts[0].length]; // equal lengths: no padding
      const streamer = new Arrivals(performance.now());
      await model.generate({
        input_ids: new Tensor('int64', BigInt64Array.from(prompts.flat(), BigInt), [b, p]),
        attention_mask: new Tensor('int64', new BigInt64Array(b * p).fill(1n), [b, p]),
        max_new_tokens: n,
        do_sample: false,
        eos_token_id: null, // EOS ignored, as for the others
        streamer,
      });
      return streamer;
    };
    return {
      async run(prompt, n) {
        const { times, ids: got } = await generate([prompt], n);
        return { times, ids: got.map((step) => step[0]) };
      },
      async batch(prompts, n) {
        const { ids: got } = await generate(prompts, n);
        return prompts.map((_, i) => got.map((step) => step[i]));
      },
    };
  },
};

if (!engines[engine] || !['f32', 'f16', 'q8_0'].includes(precision) || !['decode', 'seqs'].includes(mode)) {
  console.error('usage: node worker.mjs kvgpt|llama|tjs f32|f16|q8_0 [seqs]');
  process.exit(2);
}
const t0 = performance.now();
const e = await engines[engine](mode === 'seqs' ? SEQS : 1);
const loadMs = performance.now() - t0;
let result;
if (mode === 'seqs') {
  const prompts = Array.from({ length: SEQS }, (_, s) => ids(SEQ_PROMPT, 1000 * s));
  await e.batch(prompts.map((p) => p.slice(0, 8)), 2); // warm-up
  const t1 = performance.now();
  const out = await e.batch(prompts, SEQ_NEW);
  const wallMs = performance.now() - t1;
  const tokens = out.reduce((n, o) => n + o.length, 0);
  if (tokens !== SEQS * SEQ_NEW) throw new Error(`${engine} ${precision}: ${tokens} tokens, expected ${SEQS * SEQ_NEW}`);
  result = { seqs: SEQS, promptTokens: SEQ_PROMPT, newTokens: SEQ_NEW, wallMs, tokensPerSec: (tokens / wallMs) * 1000, greedy: out.map((o) => o.slice(0, GREEDY_IDS)) };
} else {
  await e.run(ids(8), 4); // warm-up
  const greedy = (await e.run(GREEDY_PROMPT, GREEDY_IDS)).ids;
  const decode = {};
  for (const c of CONTEXTS) {
    const { times } = await e.run(ids(c), STEPS + 1);
    decode[c] = median(times.slice(1).map((t, i) => t - times[i]));
  }
  const prefills = [];
  for (let r = 0; r < 3; r++) prefills.push((await e.run(ids(PREFILL), 1)).times[0]);
  result = { decode, prefillMs: median(prefills), greedy };
}
const peakRssMB = (process.resourceUsage().maxRSS * 1024) / 2 ** 20;
console.log(JSON.stringify({ engine, precision, mode, loadMs, ...result, peakRssMB }));
process.exit(0);
