// Issue 14's load figures: c streaming clients at once (c = 1, 8, 32, 128), each sending
// KVGPT_LOAD_REQUESTS requests one after another (a 32-token prompt of ids, 32 new tokens,
// greedy, EOS ignored), GPT-2 small's shapes with seeded random weights on the CPU (2 threads),
// through `kvgpt serve` (the official client's wire format: POST /v1/completions with stream)
// and through the library's `stream()` directly, taking turns level by level. Reports
// requests/s, generated tokens/s, TTFT and inter-token latency p50/p99 as the client sees them,
// and HTTP's throughput as a share of the library's; saves bench/results/serve-load.json. The
// HTTP clients run in a child process of their own, so the server's process does only the
// server's work (parsing thousands of events a second would otherwise share its thread).
// `npm run bench -- serve-load`; KVGPT_LOAD_LEVELS=1,8 and KVGPT_LOAD_REQUESTS=2 shorten it;
// KVGPT_LOAD_MODEL=test/fixtures/tiny-gpt2 serves a model directory instead (a fast engine, to
// load the HTTP layer itself);
// KVGPT_BENCH_DEVICE=cuda and KVGPT_BENCH_DTYPE=f16 run it on a GPU (bench/gpu/serve.sh), with
// results in KVGPT_RESULTS (default bench/results).
const fs = require('node:fs');
const { fork } = require('node:child_process');
const http = require('node:http');

const RESULTS = process.env.KVGPT_RESULTS ?? `${__dirname}/results`;
const DEVICE = process.env.KVGPT_BENCH_DEVICE ?? 'cpu';
const DTYPE = process.env.KVGPT_BENCH_DTYPE ?? 'f32';
// A model directory instead of GPT-2 small's shapes: with test/fixtures/tiny-gpt2 the engine makes
// tokens faster than one Node thread can send them, so what is left is the HTTP layer's own cost.
const MODEL = process.env.KVGPT_LOAD_MODEL;

const LEVELS = (process.env.KVGPT_LOAD_LEVELS ?? '1,8,32,128').split(',').map(Number);
const REQUESTS = Number(process.env.KVGPT_LOAD_REQUESTS ?? 2);
const PROMPT = Array.from({ length: 32 }, (_, i) => (i * 4099 + 13) % 50257);
const NEW = 32;

const pct = (xs, p) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] : NaN;
};

/** One request's token arrival times, from the library's stream. */
async function viaLibrary(model) {
  const t0 = performance.now();
  const times = [];
  for await (const _ of model.stream(PROMPT, { maxNewTokens: NEW, temperature: 0, ignoreEos: true })) times.push(performance.now() - t0);
  return times;
}

// The load generator: node:http over kept-alive connections, as load generators such as
// autocannon speak HTTP. (undici's fetch, which the openai client uses, costs the client 1.1-3.6 ms
// more a request on this machine: that is the client's cost, not the server's.)
const agent = new http.Agent({ keepAlive: true, maxSockets: Infinity });
const BODY = JSON.stringify({ prompt: PROMPT, max_tokens: NEW, temperature: 0, ignore_eos: true, stream: true });

/** The same through HTTP: server-sent events, one token each. */
function viaHttp(url) {
  const u = new URL(url);
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const times = [];
    let buf = '';
    const req = http.request({ host: u.hostname, port: u.port, path: '/v1/completions', method: 'POST', agent, headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(BODY) } }, (res) => {
      res.setEncoding('utf8');
      res.on('data', (chunk) => {
        buf += chunk;
        let i;
        while ((i = buf.indexOf('\n\n')) >= 0) {
          const event = buf.slice(0, i);
          buf = buf.slice(i + 2);
          if (event.startsWith('data: {') && JSON.parse(event.slice(6)).choices[0]?.finish_reason === null) times.push(performance.now() - t0);
        }
      });
      res.on('end', () => resolve(times));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(BODY);
  });
}

async function level(c, run) {
  // How busy this process's JS thread was (1 = never idle): whether it, not the engine, set the pace.
  const elu0 = performance.eventLoopUtilization();
  const ttft = [];
  const itl = [];
  let tokens = 0;
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: c }, async () => {
      for (let r = 0; r < REQUESTS; r++) {
        const times = await run();
        tokens += times.length;
        ttft.push(times[0]);
        for (let i = 1; i < times.length; i++) itl.push(times[i] - times[i - 1]);
      }
    }),
  );
  const seconds = (performance.now() - t0) / 1000;
  const elu = performance.eventLoopUtilization(elu0).utilization;
  return { requestsPerSecond: (c * REQUESTS) / seconds, tokensPerSecond: tokens / seconds, ttftP50Ms: pct(ttft, 50), ttftP99Ms: pct(ttft, 99), itlP50Ms: pct(itl, 50), itlP99Ms: pct(itl, 99), seconds, eventLoopUtilization: elu };
}

/** The HTTP side of a level, run by the client process. */
function httpLevel(client, url, c) {
  return new Promise((resolve) => {
    client.once('message', resolve);
    client.send({ url, c });
  });
}

async function main() {
  process.env.RAYON_NUM_THREADS ??= '2';
  const { Gpt2, serve } = require('../dist');
  const options = { maxSequences: Math.max(...LEVELS), device: DEVICE, dtype: DTYPE };
  const model = MODEL ? await Gpt2.load(MODEL, options) : await Gpt2.random({}, { seed: 0, ...options });
  console.log(`${MODEL ?? 'GPT-2 small shapes, random weights'}, ${model.info.device} ${model.info.dtype}`);
  const server = await serve(model, { port: 0 });
  await viaLibrary(model); // warm-up
  const client = fork(__filename, ['client']);
  await httpLevel(client, server.url, 1); // warm-up
  const rows = [];
  const busy = (r) => (r.serverEventLoopUtilization === undefined ? `, JS thread busy ${(100 * r.eventLoopUtilization).toFixed(0)} %` : `, server JS thread busy ${(100 * r.serverEventLoopUtilization).toFixed(0)} %, client's ${(100 * r.clientEventLoopUtilization).toFixed(0)} %, ${r.eventsPerWrite.toFixed(2)} events a write`);
  const fmt = (r) => `${r.requestsPerSecond.toFixed(2)} req/s, ${r.tokensPerSecond.toFixed(1)} tokens/s, TTFT p50/p99 ${r.ttftP50Ms.toFixed(1)}/${r.ttftP99Ms.toFixed(1)} ms, ITL p50/p99 ${r.itlP50Ms.toFixed(2)}/${r.itlP99Ms.toFixed(2)} ms${busy(r)}`;
  for (const c of LEVELS) {
    const lib = await level(c, () => viaLibrary(model));
    const counters = async () => {
      const text = await (await fetch(`${server.url}/metrics`)).text();
      return ['events', 'writes'].map((k) => Number(new RegExp(`^kvgpt_stream_${k}_total (\\d+)`, 'm').exec(text)[1]));
    };
    const [e0, w0] = await counters();
    const elu0 = performance.eventLoopUtilization();
    const http = await httpLevel(client, server.url, c);
    // The server's thread during the HTTP level, and the load generator's (its own process).
    http.serverEventLoopUtilization = performance.eventLoopUtilization(elu0).utilization;
    http.clientEventLoopUtilization = http.eventLoopUtilization;
    delete http.eventLoopUtilization;
    const [e1, w1] = await counters();
    http.eventsPerWrite = (e1 - e0) / (w1 - w0); // above 1 when the server ran behind and wrote piled-up tokens at once
    const share = http.tokensPerSecond / lib.tokensPerSecond;
    rows.push({ clients: c, library: lib, http, httpShare: share });
    console.log(`c=${c} library: ${fmt(lib)}`);
    console.log(`c=${c} http:    ${fmt(http)} (${(100 * share).toFixed(1)} % of the library's tokens/s)`);
  }
  client.disconnect();
  await server.close();
  model.dispose();
  fs.mkdirSync(RESULTS, { recursive: true });
  fs.writeFileSync(`${RESULTS}/serve-load.json`, JSON.stringify({ date: new Date().toISOString(), device: DEVICE, dtype: DTYPE, promptTokens: PROMPT.length, newTokens: NEW, requestsPerClient: REQUESTS, rows }, null, 2));
}
module.exports = main;
if (require.main === module && process.argv[2] === 'client') {
  process.on('message', async ({ url, c }) => process.send(await level(c, () => viaHttp(url))));
} else if (require.main === module) {
  main().catch((e) => {
    console.error(e);
    process.exit(1);
  });
}
