// `kvgpt serve` through the official `openai` client and raw HTTP, on the tiny fixture.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import OpenAI from 'openai';
import { spawn } from 'node:child_process';
import http from 'node:http';
import net from 'node:net';
import { join } from 'node:path';
import { Gpt2, serve, type Server } from '../src';
import { EventWriter } from '../src/server';
import { reference, TINY } from './helpers';

const ref = reference(TINY);
let server: Server;
let client: OpenAI;
let model: Gpt2;

beforeAll(async () => {
  model = await Gpt2.load(TINY);
  server = await serve(model, { port: 0, apiKey: 'sk-test' });
  client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'sk-test', maxRetries: 0 });
});
afterAll(async () => {
  await server.close();
  model.dispose();
});

const post = (path: string, body: string, headers: Record<string, string> = {}) =>
  fetch(`${server.url}${path}`, { method: 'POST', body, headers: { 'content-type': 'application/json', authorization: 'Bearer sk-test', ...headers } });

describe('kvgpt serve with the openai client', () => {
  it('completes as the library does: greedy text, usage, finish_reason', async () => {
    const p = ref.prompts[0];
    const r = await client.completions.create({ model: 'tiny-gpt2', prompt: p.prompt, max_tokens: 40, temperature: 0, ignore_eos: true } as never);
    expect(r.object).toBe('text_completion');
    expect(r.choices[0].text).toBe(p.greedy_text.slice(p.prompt.length));
    expect(r.choices[0].finish_reason).toBe('length');
    expect(r.usage).toEqual({ prompt_tokens: p.input_ids.length, completion_tokens: 40, total_tokens: p.input_ids.length + 40 });
    expect((await client.models.list()).data.map((m) => m.id)).toEqual(['tiny-gpt2']);
  });

  it('streams the same text as server-sent events ending with [DONE]', async () => {
    const p = ref.prompts[1];
    const stream = await client.completions.create({ model: 'tiny-gpt2', prompt: p.prompt, max_tokens: 40, temperature: 0, ignore_eos: true, stream: true, stream_options: { include_usage: true } } as never) as unknown as AsyncIterable<OpenAI.Completion>;
    let text = '';
    let finish: string | null = null;
    let usage: OpenAI.CompletionUsage | undefined;
    for await (const c of stream) {
      for (const ch of c.choices) {
        text += ch.text;
        finish = ch.finish_reason ?? finish;
      }
      usage = c.usage ?? usage;
    }
    expect(text).toBe(p.greedy_text.slice(p.prompt.length));
    expect(finish).toBe('length');
    expect(usage?.completion_tokens).toBe(40);
  });

  it('several prompts, n, seed, stop and logprobs', async () => {
    const prompts = [ref.prompts[0].prompt, ref.prompts[2].prompt];
    const body = { model: 'tiny-gpt2', prompt: prompts, n: 2, max_tokens: 12, temperature: 0.9, seed: 5, logprobs: 3 };
    const a = await client.completions.create(body);
    const b = await client.completions.create(body);
    expect(a.choices.map((c) => c.index)).toEqual([0, 1, 2, 3]);
    expect(a.choices.map((c) => c.text)).toEqual(b.choices.map((c) => c.text));
    expect(a.choices[0].text).not.toBe(a.choices[1].text); // choice i draws with seed + i
    // The same draw as the library with that seed.
    const lib = await model.generate(prompts[1], { maxNewTokens: 12, temperature: 0.9, seed: 5 + 3 });
    expect(a.choices[3].text).toBe(lib.text);
    const lp = a.choices[0].logprobs!;
    expect(lp.tokens).toHaveLength(lp.token_logprobs!.length);
    expect(Object.keys(lp.top_logprobs![0]!).length).toBeLessThanOrEqual(3);
    expect(lp.token_logprobs!.every((x) => x! <= 0)).toBe(true);
    const stopped = await client.completions.create({ model: 'tiny-gpt2', prompt: ref.prompts[0].prompt, max_tokens: 40, temperature: 0, stop: [' Gould'], ignore_eos: true } as never);
    expect(stopped.choices[0]).toMatchObject({ text: ' guides meg obedient obedient 157 prof Objective tips Downloads', finish_reason: 'stop' });
    const echo = await client.completions.create({ model: 'tiny-gpt2', prompt: 'Hello, my dog', max_tokens: 3, temperature: 0, echo: true, logprobs: 1 });
    expect(echo.choices[0].text.startsWith('Hello, my dog')).toBe(true);
    expect(echo.choices[0].logprobs!.token_logprobs![0]).toBeNull();
  });

  it('errors arrive as the client error classes', async () => {
    await expect(client.completions.create({ model: 'tiny-gpt2', prompt: 'x', max_tokens: 2, frequency_penalty: 1 } as never)).rejects.toBeInstanceOf(OpenAI.BadRequestError);
    const bad = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'sk-wrong', maxRetries: 0 });
    await expect(bad.completions.create({ model: 'tiny-gpt2', prompt: 'x' })).rejects.toBeInstanceOf(OpenAI.AuthenticationError);
    await expect(client.chat.completions.create({ model: 'tiny-gpt2', messages: [{ role: 'user', content: 'hi' }] })).rejects.toBeInstanceOf(OpenAI.BadRequestError);
    await expect(client.completions.create({ model: 'tiny-gpt2', prompt: 'word '.repeat(200) })).rejects.toMatchObject({ status: 400, code: 'context_length_exceeded' });
  });
});

describe('kvgpt serve over raw HTTP', () => {
  it('answers bad input with OpenAI error objects and the right status', async () => {
    const cases: [string, Response, number, RegExp][] = [
      ['invalid JSON', await post('/v1/completions', '{"prompt": '), 400, /could not parse the JSON body/],
      ['unknown field', await post('/v1/completions', JSON.stringify({ prompt: 'x', best_of: 2 })), 400, /Unrecognized request argument supplied: best_of/],
      ['wrong type', await post('/v1/completions', JSON.stringify({ prompt: 'x', max_tokens: 'ten' })), 400, /max_tokens/],
      ['out of range', await post('/v1/completions', JSON.stringify({ prompt: 'x', top_p: 2 })), 400, /topP must be in \(0, 1\]/],
      ['id outside the vocabulary', await post('/v1/completions', JSON.stringify({ prompt: [1, 99999] })), 400, /outside the vocabulary/],
      ['body over the limit', await post('/v1/completions', JSON.stringify({ prompt: 'x'.repeat(2 << 20) })), 413, /over 1048576 bytes/],
      ['no API key', await fetch(`${server.url}/v1/models`), 401, /Missing API key/],
      ['unknown route', await fetch(`${server.url}/v2/nothing`, { headers: { authorization: 'Bearer sk-test' } }), 404, /Unknown request URL/],
    ];
    for (const [what, res, status, message] of cases) {
      expect(res.status, what).toBe(status);
      const body = await res.json();
      expect(body.error.message, what).toMatch(message);
      expect(typeof body.error.type, what).toBe('string');
    }
    // /health needs no key.
    expect(await (await fetch(`${server.url}/health`)).json()).toEqual({ status: 'ok', model: 'tiny-gpt2' });
  });

  it('a slow reader gets its whole stream and holds up no one else', async () => {
    const p = ref.prompts[0];
    const solo = await model.generate(p.prompt, { maxNewTokens: 120, temperature: 0, ignoreEos: true });
    // 16 choices of 120 tokens: far more events than the socket buffers hold while paused.
    const req = http.request(`${server.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json', authorization: 'Bearer sk-test' } });
    req.end(JSON.stringify({ prompt: p.prompt, n: 16, max_tokens: 120, temperature: 0, ignore_eos: true, stream: true }));
    const res = await new Promise<http.IncomingMessage>((resolve) => req.on('response', resolve));
    res.pause();
    await new Promise((r) => setTimeout(r, 300));
    // Others are served meanwhile.
    const t0 = performance.now();
    const others = await Promise.all([1, 2, 3].map((i) => client.completions.create({ model: 'tiny-gpt2', prompt: ref.prompts[i].prompt, max_tokens: 10, temperature: 0 })));
    expect(others.every((o) => o.choices[0].text.length > 0)).toBe(true);
    expect(performance.now() - t0).toBeLessThan(3000);
    // Then the slow reader reads everything, in order per choice.
    let raw = '';
    res.setEncoding('utf8');
    res.on('data', (d: string) => (raw += d));
    res.resume();
    await new Promise((r) => res.on('end', r));
    expect(raw.endsWith('data: [DONE]\n\n')).toBe(true);
    const texts = new Array(16).fill('');
    for (const line of raw.split('\n\n')) {
      if (!line.startsWith('data: {')) continue;
      for (const c of JSON.parse(line.slice(6)).choices) texts[c.index] += c.text;
    }
    expect(texts).toEqual(new Array(16).fill(solo.text));
  });

  it('a client that disconnects mid-stream frees its sequence', async () => {
    const res = await post('/v1/completions', JSON.stringify({ prompt: 'Hello', max_tokens: 100000, ignore_eos: true, stream: true }), {});
    const reader = res.body!.getReader();
    await reader.read(); // the first event
    const before = model.engineStats();
    expect(before.active).toBe(1);
    await reader.cancel();
    for (let i = 0; i < 100 && model.engineStats().active > 0; i++) await new Promise((r) => setTimeout(r, 20));
    expect(model.engineStats().active).toBe(0);
  });
});

/** Sends raw bytes on a socket of its own; `data` collects what comes back. */
function rawClient() {
  const u = new URL(server.url);
  const socket = net.connect(Number(u.port), u.hostname);
  const c = { socket, data: '', closed: new Promise<void>((r) => socket.on('close', () => r())) };
  socket.setEncoding('utf8');
  socket.on('data', (d: string) => (c.data += d));
  socket.on('error', () => {}); // a reset is what some of these clients are for
  return c;
}
const streamRequest = (body: object, extra = '') => {
  const json = JSON.stringify({ stream: true, ...body });
  return `POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nauthorization: Bearer sk-test\r\n${extra}content-length: ${Buffer.byteLength(json)}\r\n\r\n${json}`;
};
const until = async (cond: () => boolean, ms = 5000) => {
  for (const t0 = performance.now(); !cond() && performance.now() - t0 < ms; ) await new Promise((r) => setTimeout(r, 10));
  return cond();
};
const metric = async (name: string) => Number(new RegExp(`^${name} (\\d+)`, 'm').exec(await (await fetch(`${server.url}/metrics`)).text())?.[1]);

describe('EventWriter', () => {
  it('events of one turn leave in one write; nothing is written after the end', async () => {
    const writes: number[] = [];
    const srv = http.createServer((_req, res) => {
      res.on('error', (e) => writes.push(-1, e ? 1 : 0)); // a write after end would land here
      const w = new EventWriter(res, (events) => writes.push(events));
      for (const i of [1, 2, 3]) w.send(JSON.stringify({ i }));
      setImmediate(() => {
        w.send(JSON.stringify({ i: 4 }));
        w.end();
        w.send(JSON.stringify({ i: 5 })); // a choice that finished after an error ended the stream
      });
    });
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
    const { port } = srv.address() as net.AddressInfo;
    const body = await (await fetch(`http://127.0.0.1:${port}/`)).text();
    await new Promise((r) => setTimeout(r, 50));
    srv.close();
    expect(body).toBe('data: {"i":1}\n\ndata: {"i":2}\n\ndata: {"i":3}\n\ndata: {"i":4}\n\ndata: [DONE]\n\n');
    expect(writes).toEqual([3, 1]);
  });
});

describe('kvgpt serve and misbehaving stream consumers', () => {
  // Each of these runs beside a well-behaved streaming client, which must get its solo result,
  // and must leave the engine with nothing in flight and the server answering.
  const p = () => ref.prompts[1].prompt;
  async function beside(misbehave: () => Promise<void>) {
    const solo = await model.generate(p(), { maxNewTokens: 60, temperature: 0, ignoreEos: true });
    const good = (async () => {
      const stream = (await client.completions.create({ model: 'tiny-gpt2', prompt: p(), max_tokens: 60, temperature: 0, ignore_eos: true, stream: true } as never)) as unknown as AsyncIterable<OpenAI.Completion>;
      let text = '';
      for await (const c of stream) text += c.choices.map((ch) => ch.text).join('');
      return text;
    })();
    await misbehave();
    expect(await good).toBe(solo.text);
    expect(await until(() => model.engineStats().active + model.engineStats().waiting === 0)).toBe(true);
    expect((await fetch(`${server.url}/health`)).status).toBe(200);
  }

  it('garbage sent on the connection mid-stream: that stream ends, no one else is touched', async () => {
    await beside(async () => {
      const c = rawClient();
      c.socket.write(streamRequest({ prompt: 'Hello', max_tokens: 100000, ignore_eos: true }));
      expect(await until(() => c.data.includes('data: {'))).toBe(true);
      c.socket.write('\x00\xff not HTTP at all \r\n\r\n');
      await c.closed;
      expect(c.data.startsWith('HTTP/1.1 200')).toBe(true);
    });
  });

  it('a client that half-closes after its request, or resets mid-stream', async () => {
    await beside(async () => {
      const half = rawClient();
      half.socket.end(streamRequest({ prompt: 'Hello', max_tokens: 30, temperature: 0, ignore_eos: true }));
      const reset = rawClient();
      reset.socket.write(streamRequest({ prompt: 'Hello', max_tokens: 100000, ignore_eos: true }));
      expect(await until(() => reset.data.includes('data: {'))).toBe(true);
      reset.socket.resetAndDestroy();
      await Promise.all([half.closed, reset.closed]);
    });
  });

  it('two streams pipelined on one connection both arrive whole, in order', async () => {
    const solo = await model.generate(p(), { maxNewTokens: 12, temperature: 0, ignoreEos: true });
    await beside(async () => {
      const c = rawClient();
      const body = { prompt: p(), max_tokens: 12, temperature: 0, ignore_eos: true };
      c.socket.write(streamRequest(body) + streamRequest({ ...body, prompt: model.tokenize(p()) }, 'connection: close\r\n'));
      await c.closed;
      const responses = c.data.split('HTTP/1.1 ').filter(Boolean);
      expect(responses).toHaveLength(2);
      for (const r of responses) {
        expect(r.startsWith('200')).toBe(true);
        const events = [...r.matchAll(/data: (\{.*\})\r?\n/g)].map((m) => JSON.parse(m[1]));
        expect(events.map((e) => e.choices[0]?.text ?? '').join('')).toBe(solo.text);
        expect(r).toContain('data: [DONE]');
      }
    });
  });

  it('a server that falls behind its clients sends the tokens that piled up in one write', async () => {
    const solo = await model.generate(p(), { maxNewTokens: 80, temperature: 0, ignoreEos: true });
    const [events0, writes0] = [await metric('kvgpt_stream_events_total'), await metric('kvgpt_stream_writes_total')];
    const res = await post('/v1/completions', JSON.stringify({ prompt: p(), max_tokens: 80, temperature: 0, ignore_eos: true, stream: true }));
    const reader = res.body!.getReader();
    let raw = new TextDecoder().decode((await reader.read()).value);
    // The server's thread (this one) is held while the engine makes every token.
    const t0 = performance.now();
    while (model.engineStats().active > 0 && performance.now() - t0 < 10_000);
    for (let r = await reader.read(); !r.done; r = await reader.read()) raw += new TextDecoder().decode(r.value);
    const texts = raw.split('\n\n').filter((e) => e.startsWith('data: {')).map((e) => JSON.parse(e.slice(6)).choices[0].text);
    expect(texts.join('')).toBe(solo.text);
    const events = (await metric('kvgpt_stream_events_total')) - events0;
    const writes = (await metric('kvgpt_stream_writes_total')) - writes0;
    expect(events).toBe(81); // 80 tokens and the finish_reason
    expect(writes).toBeLessThanOrEqual(4);
  });
});

describe('kvgpt serve under load', () => {
  it('past maxSequences + maxQueue a request gets 429 with Retry-After, and /metrics counts it all', async () => {
    // A context of 4,096 positions, so a sequence lasts until its client leaves.
    using small = await Gpt2.random({ n_layer: 1, n_head: 2, n_embd: 32, n_positions: 4096, vocab_size: 1000 }, { maxSequences: 1 });
    const s = await serve(small, { port: 0, maxQueue: 1 });
    try {
      const long = (body: object) => fetch(`${s.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: [1, 2, 3], max_tokens: 4000, ignore_eos: true, stream: true, ...body }) });
      const a = await long({});
      const b = await long({});
      const reader = a.body!.getReader();
      await reader.read();
      const c = await long({});
      expect(c.status).toBe(429);
      expect(c.headers.get('retry-after')).toBe('1');
      expect((await c.json()).error).toMatchObject({ type: 'rate_limit_error', code: 'rate_limit_exceeded' });
      // n counts: two sequences do not fit either.
      expect((await fetch(`${s.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: [1], n: 2 }) })).status).toBe(429);
      expect(small.engineStats()).toMatchObject({ active: 1, waiting: 1 });
      await reader.cancel();
      await b.body!.cancel();
      for (let i = 0; i < 100 && small.engineStats().active + small.engineStats().waiting > 0; i++) await new Promise((r) => setTimeout(r, 20));
      const ok = await fetch(`${s.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: [1, 2], max_tokens: 5 }) });
      expect(ok.status).toBe(200);
      const metrics = await (await fetch(`${s.url}/metrics`)).text();
      expect(metrics).toMatch(/kvgpt_requests_total\{route="\/v1\/completions",status="429"\} 2/);
      expect(metrics).toMatch(/kvgpt_requests_total\{route="\/v1\/completions",status="200"\} 3/);
      expect(metrics).toMatch(/kvgpt_generated_tokens_total \d+/);
      expect(metrics).toMatch(/kvgpt_time_to_first_token_seconds_count 2/); // b left before its first token
      expect(metrics).toMatch(/kvgpt_token_latency_seconds_bucket\{le="0.005"\} \d+/);
      expect(metrics).toMatch(/kvgpt_queue_depth 0/);
      expect(metrics).toMatch(/kvgpt_engine_mean_batch_size [\d.]+/);
    } finally {
      await s.close();
    }
  });

  it('64 concurrent streaming clients get exactly their solo greedy results', async () => {
    const prompts = ref.prompts.map((p) => p.prompt);
    const solo = await Promise.all(prompts.map((p) => model.generate(p, { maxNewTokens: 20, temperature: 0, ignoreEos: true })));
    const one = async (i: number) => {
      const stream = (await client.completions.create({ model: 'tiny-gpt2', prompt: prompts[i % prompts.length], max_tokens: 20, temperature: 0, ignore_eos: true, stream: true } as never)) as unknown as AsyncIterable<OpenAI.Completion>;
      let text = '';
      for await (const c of stream) text += c.choices.map((ch) => ch.text).join('');
      return text;
    };
    for (let round = 0; round < 3; round++) {
      const texts = await Promise.all(Array.from({ length: 64 }, (_, i) => one(i)));
      texts.forEach((t, i) => expect(t).toBe(solo[i % prompts.length].text));
    }
    expect(model.engineStats().maxBatch).toBeGreaterThan(8);
  });
});

describe('kvgpt serve (the command)', () => {
  it('serves until SIGTERM, then exits 0', async () => {
    const child = spawn(process.execPath, [join(__dirname, '..', 'dist', 'cli.js'), 'serve', '--model', TINY, '--port', '0'], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    const url = await new Promise<string>((resolve, reject) => {
      child.stderr.on('data', (d) => {
        err += d;
        const m = / on (http:\/\/\S+) /.exec(err);
        if (m) resolve(m[1]);
      });
      child.on('exit', () => reject(new Error(err)));
    });
    const r = await fetch(`${url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: ref.prompts[0].prompt, max_tokens: 5, temperature: 0 }) });
    expect((await r.json()).choices[0].text).toBe(ref.prompts[0].greedy_text.slice(ref.prompts[0].prompt.length).split(' ').slice(0, 6).join(' '));
    child.kill('SIGTERM');
    const code = await new Promise((resolve) => child.on('exit', resolve));
    expect(code).toBe(0);
  });
});
