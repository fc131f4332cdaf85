// `kvgpt serve`: an OpenAI-compatible completions server on Fastify over one model, whose engine
// batches every request's sequences. Stateless between requests: a process holds the weights
// once and a KV cache per sequence in flight.

import Fastify, { type FastifyError, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import { createHash, randomUUID, timingSafeEqual } from 'node:crypto';
import { once, setMaxListeners } from 'node:events';
import { Gpt2, type LoadOptions } from './model';
import type { GenerateOptions, GenerateResult, StopReason, TokenChunk } from './generate';
import type { TokenLogprob } from './score';
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';

export interface ServeOptions {
  /** Address to listen on; default 127.0.0.1. */
  host?: string;
  /** Port; default 8080 (0 picks a free one). */
  port?: number;
  /** Requests must carry `Authorization: Bearer <apiKey>` (compared in constant time); /health stays open. */
  apiKey?: string;
  /** The name /v1/models lists and responses carry; default the model directory's name. */
  modelName?: string;
  /** Largest request body in bytes; default 1 MiB (413 beyond). */
  bodyLimit?: number;
  /**
   * Sequences (prompts x n) that may wait for a place beyond the engine's `maxSequences`; a
   * request that would exceed it gets 429 with Retry-After. Default 1024.
   */
  maxQueue?: number;
}

export interface Server {
  /** `http://host:port`. */
  readonly url: string;
  readonly model: Gpt2;
  /** Stops accepting, lets running requests finish (aborting them after `timeoutMs`, default 30 s), and closes. */
  close(timeoutMs?: number): Promise<void>;
}

/** OpenAI's error object. */
function apiError(message: string, type = 'invalid_request_error', param: string | null = null, code: string | null = null) {
  return { error: { message, type, param, code } };
}

const ids = { type: 'array', items: { type: 'integer', minimum: 0 }, minItems: 1 };
const nullable = (t: string) => ({ type: [t, 'null'] });
const COMPLETION_BODY = {
  type: 'object',
  additionalProperties: false,
  properties: {
    model: { type: 'string' },
    prompt: { anyOf: [{ type: 'string' }, { type: 'array', items: { type: 'string' }, minItems: 1 }, ids, { type: 'array', items: ids, minItems: 1 }] },
    max_tokens: { ...nullable('integer'), minimum: 0 },
    temperature: { ...nullable('number'), minimum: 0 },
    top_p: nullable('number'),
    top_k: { ...nullable('integer'), minimum: 0 },
    repetition_penalty: nullable('number'),
    seed: { ...nullable('integer'), minimum: 0 },
    stop: { anyOf: [{ type: 'string' }, { type: 'array', items: { type: 'string' }, maxItems: 16 }, { type: 'null' }] },
    n: { ...nullable('integer'), minimum: 1, maximum: 128 },
    stream: nullable('boolean'),
    stream_options: { type: ['object', 'null'], additionalProperties: false, properties: { include_usage: { type: 'boolean' } } },
    logprobs: { ...nullable('integer'), minimum: 0, maximum: 20 },
    echo: nullable('boolean'),
    ignore_eos: nullable('boolean'),
    user: { type: 'string' },
  },
} as const;

interface CompletionBody {
  model?: string;
  prompt?: string | string[] | number[] | number[][];
  max_tokens?: number | null;
  temperature?: number | null;
  top_p?: number | null;
  top_k?: number | null;
  repetition_penalty?: number | null;
  seed?: number | null;
  stop?: string | string[] | null;
  n?: number | null;
  stream?: boolean | null;
  stream_options?: { include_usage?: boolean } | null;
  logprobs?: number | null;
  echo?: boolean | null;
  ignore_eos?: boolean | null;
  user?: string;
}

/** What each kvgpt stop reason is in OpenAI's terms. */
export const FINISH_REASON: Record<StopReason, 'stop' | 'length'> = {
  eos: 'stop',
  stop_string: 'stop',
  max_new_tokens: 'length',
  context_full: 'length',
  aborted: 'stop',
};

/** The prompts of a request: a string, strings, ids, or arrays of ids. */
function prompts(p: CompletionBody['prompt']): (string | number[])[] {
  if (p === undefined) return [''];
  if (typeof p === 'string') return [p];
  if (p.length > 0 && typeof p[0] === 'number') return [p as number[]];
  return p as (string | number[])[];
}

/** OpenAI's legacy logprobs object for some tokens (their texts decoded alone). */
function legacyLogprobs(list: (TokenLogprob | null)[], texts: string[], offset0: number) {
  let offset = offset0;
  const text_offset: number[] = [];
  for (const t of texts) {
    text_offset.push(offset);
    offset += t.length;
  }
  return {
    tokens: texts,
    token_logprobs: list.map((l) => (l ? l.logprob : null)),
    top_logprobs: list.map((l) => (l ? Object.fromEntries(l.top.map((a) => [a.text, a.logprob])) : null)),
    text_offset,
  };
}

/**
 * Server-sent events to one response, written at most once per turn of the event loop. Each write
 * is a system call (about 35 µs on loopback, measured with --cpu-prof: most of the server's time
 * per token): while the server keeps up, every event still goes out in the turn it was made; when
 * it falls behind, the tokens that arrived meanwhile leave in one write instead of one each.
 */
export class EventWriter {
  #raw: import('node:http').ServerResponse;
  #onWrite: ((events: number) => void) | undefined;
  #pending = '';
  #count = 0;
  #scheduled = false;
  #drained: Promise<void> | undefined;

  /** `onWrite` hears of each write and how many events it carried. */
  constructor(raw: import('node:http').ServerResponse, onWrite?: (events: number) => void) {
    this.#raw = raw;
    this.#onWrite = onWrite;
  }

  /** Queues `data: <json>`; the promise (when there is one) settles once the client has caught up. */
  send(json: string): Promise<void> | undefined {
    if (this.#raw.destroyed || this.#raw.writableEnded) return undefined; // a choice still running after an error ended the stream
    this.#pending += `data: ${json}\n\n`;
    this.#count++;
    if (!this.#scheduled) {
      this.#scheduled = true;
      setImmediate(() => this.#flush());
    }
    return this.#drained;
  }

  #take(): string {
    const out = this.#pending;
    this.#onWrite?.(this.#count);
    this.#pending = '';
    this.#count = 0;
    return out;
  }

  #flush() {
    this.#scheduled = false;
    if (this.#pending === '' || this.#raw.destroyed || this.#raw.writableEnded) return;
    // A slow reader: later sends wait until the socket drains (or closes) rather than buffer.
    if (!this.#raw.write(this.#take()) && !this.#drained) {
      this.#drained = Promise.race([once(this.#raw, 'drain'), once(this.#raw, 'close')]).then(() => {
        this.#drained = undefined;
      });
    }
  }

  /** Sends what is queued and `data: [DONE]` in one write, and ends the response. */
  end() {
    if (this.#raw.destroyed || this.#raw.writableEnded) return;
    this.#raw.end(`${this.#take()}data: [DONE]\n\n`);
  }
}

export async function serve(modelOrDir: Gpt2 | string, options: ServeOptions & LoadOptions = {}): Promise<Server> {
  const { host = '127.0.0.1', port = 8080, apiKey, modelName, bodyLimit = 1 << 20, maxQueue = 1024, ...load } = options;
  if (!Number.isInteger(maxQueue) || maxQueue < 0) throw Object.assign(new RangeError(`maxQueue must be an integer >= 0, got ${maxQueue}`), { code: 'KVGPT_OPTION_RANGE' });
  const model = typeof modelOrDir === 'string' ? await Gpt2.load(modelOrDir, load) : modelOrDir;
  const name = modelName ?? (model.info.dir.split('/').filter(Boolean).pop() || 'kvgpt');
  const created = Math.floor(Date.now() / 1000);
  const keyHash = apiKey === undefined ? undefined : createHash('sha256').update(apiKey).digest();
  const inFlight = new Set<AbortController>();
  const capacity = model.engineStats().maxSequences + maxQueue;
  let sequences = 0; // admitted by this server and not yet ended

  // Prometheus metrics, in a registry of this server's own.
  const registry = new Registry();
  collectDefaultMetrics({ register: registry }); // process_resident_memory_bytes, heap, event-loop lag
  const requests = new Counter({ name: 'kvgpt_requests_total', help: 'HTTP requests by route and status', labelNames: ['route', 'status'], registers: [registry] });
  const promptTokens = new Counter({ name: 'kvgpt_prompt_tokens_total', help: 'prompt tokens of the completions answered (once per prompt)', registers: [registry] });
  const streamEvents = new Counter({ name: 'kvgpt_stream_events_total', help: 'server-sent events sent (a token of a choice is one)', registers: [registry] });
  const streamWrites = new Counter({ name: 'kvgpt_stream_writes_total', help: 'socket writes that carried them: fewer than events when the server runs behind its clients', registers: [registry] });
  const onWrite = (events: number) => {
    streamWrites.inc();
    streamEvents.inc(events);
  };
  const generatedTokens = new Counter({ name: 'kvgpt_generated_tokens_total', help: 'tokens generated', registers: [registry] });
  const ttft = new Histogram({ name: 'kvgpt_time_to_first_token_seconds', help: 'from a completion reaching the engine to its first token', buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10], registers: [registry] });
  const tokenLatency = new Histogram({ name: 'kvgpt_token_latency_seconds', help: 'each decode step of each sequence (the time between its tokens)', buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1], registers: [registry] });
  const gauge = (name: string, help: string, read: () => number) => new Gauge({ name, help, registers: [registry], collect() { this.set(read()); } });
  gauge('kvgpt_queue_depth', 'sequences waiting for a place in the engine', () => model.engineStats().waiting);
  gauge('kvgpt_active_sequences', 'sequences in flight in the engine', () => model.engineStats().active);
  gauge('kvgpt_engine_steps', 'forward passes run since load', () => model.engineStats().steps);
  gauge('kvgpt_engine_mean_batch_size', 'sequences per forward pass, mean since load', () => model.engineStats().meanBatchSize);
  const observe = (r: GenerateResult) => {
    generatedTokens.inc(r.tokens.length);
    if (r.tokens.length > 0) ttft.observe(r.timings.ttftMs / 1000);
    for (const ms of r.timings.stepMs) tokenLatency.observe(ms / 1000);
  };

  const app: FastifyInstance = Fastify({
    bodyLimit,
    ajv: { customOptions: { removeAdditional: false, coerceTypes: false, useDefaults: false } },
  });

  app.addHook('onResponse', async (req, reply) => {
    requests.inc({ route: req.routeOptions.url ?? 'unknown', status: String(reply.statusCode) });
  });

  app.addHook('onRequest', async (req, reply) => {
    if (keyHash === undefined || req.url === '/health' || req.url === '/metrics') return;
    const m = /^Bearer (.+)$/.exec(req.headers.authorization ?? '');
    const given = createHash('sha256').update(m ? m[1] : '').digest();
    if (!m || !timingSafeEqual(given, keyHash)) {
      return reply.code(401).send(apiError(m ? 'Incorrect API key provided.' : 'Missing API key: send Authorization: Bearer <key>.', 'invalid_request_error', null, 'invalid_api_key'));
    }
  });

  app.setErrorHandler((err: FastifyError, _req, reply) => {
    if (err.validation) {
      const v = err.validation[0];
      const extra = (v?.params as { additionalProperty?: string } | undefined)?.additionalProperty;
      if (extra) return reply.code(400).send(apiError(`Unrecognized request argument supplied: ${extra}`, 'invalid_request_error', extra));
      const param = (v?.instancePath ?? '').replace(/^\//, '').split('/')[0] || null;
      return reply.code(400).send(apiError(`${err.message}`, 'invalid_request_error', param));
    }
    if (err.code === 'FST_ERR_CTP_BODY_TOO_LARGE') return reply.code(413).send(apiError(`The request body is over ${bodyLimit} bytes.`, 'invalid_request_error', null, 'request_too_large'));
    if (err.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE') return reply.code(415).send(apiError('Send the body as application/json.'));
    if ((err.statusCode ?? 500) < 500) return reply.code(err.statusCode!).send(apiError(err.code?.startsWith('FST_ERR_CTP') || err instanceof SyntaxError ? `We could not parse the JSON body of your request: ${err.message}` : err.message));
    const e = err as Error & { code?: string };
    if (e.code === 'KVGPT_INVALID_INPUT' && /context is/.test(e.message)) return reply.code(400).send(apiError(e.message, 'invalid_request_error', 'prompt', 'context_length_exceeded'));
    if (e.code === 'KVGPT_INVALID_INPUT' || e.code === 'KVGPT_OPTION_RANGE' || e.code === 'KVGPT_OPTION_TYPE' || e.code === 'KVGPT_TOKENIZER') {
      return reply.code(400).send(apiError(e.message, 'invalid_request_error', null, e.code.toLowerCase()));
    }
    return reply.code(500).send(apiError(e.message, 'server_error', null, e.code ?? null));
  });

  app.setNotFoundHandler((req, reply) => {
    reply.code(404).send(apiError(`Unknown request URL: ${req.method} ${req.url}. This server has POST /v1/completions, GET /v1/models, GET /health and GET /metrics.`, 'invalid_request_error', null, 'unknown_url'));
  });

  app.get('/health', async () => ({ status: 'ok', model: name }));

  app.get('/metrics', async (_req, reply) => reply.type(registry.contentType).send(await registry.metrics()));

  app.get('/v1/models', async () => ({ object: 'list', data: [{ id: name, object: 'model', created, owned_by: 'kvgpt' }] }));

  app.post('/v1/chat/completions', async (_req, reply) =>
    reply.code(400).send(apiError('GPT-2 has no chat template, so this server does not serve chat completions: send the conversation as text to POST /v1/completions.', 'invalid_request_error', null, 'chat_not_supported')),
  );

  app.post('/v1/completions', { schema: { body: COMPLETION_BODY } }, async (req: FastifyRequest<{ Body: CompletionBody }>, reply: FastifyReply) => {
    const b = req.body ?? {};
    const list = prompts(b.prompt);
    const n = b.n ?? 1;
    const k = b.logprobs ?? undefined;
    const controller = new AbortController();
    setMaxListeners(list.length * n + 10, controller.signal); // every choice listens to it
    const opts = (i: number): GenerateOptions => ({
      maxNewTokens: b.max_tokens ?? 16,
      temperature: b.temperature ?? undefined,
      topP: b.top_p ?? undefined,
      topK: b.top_k ?? undefined,
      repetitionPenalty: b.repetition_penalty ?? undefined,
      // n completions of one prompt with one seed would be n copies: choice i draws with seed + i.
      seed: b.seed == null ? undefined : b.seed + i,
      stop: b.stop ?? undefined,
      ignoreEos: b.ignore_eos ?? undefined,
      logprobs: k,
      signal: controller.signal,
    });
    // Every prompt and option checked before any work, so that a stream can still answer 400.
    for (const p of list) model.checkPrompt(p, opts(0));
    const need = list.length * n;
    if (sequences + need > capacity) {
      return reply
        .code(429)
        .header('retry-after', '1')
        .send(apiError(`The server is at capacity: ${sequences} sequences in flight or waiting, room for ${capacity}; retry later.`, 'rate_limit_error', null, 'rate_limit_exceeded'));
    }
    sequences += need;
    inFlight.add(controller);
    // A client that goes away aborts its sequences at once.
    reply.raw.on('close', () => {
      if (!reply.raw.writableFinished) controller.abort();
    });
    const id = `cmpl-${randomUUID()}`;
    const base = { id, object: 'text_completion', created: Math.floor(Date.now() / 1000), model: name };
    const text = (t: number) => model.decode([t]);
    const echo = b.echo === true;
    // The prompts' own log-probabilities, for echo with logprobs (the first token has none).
    const promptLogprobs = async (p: string | number[]) => {
      const idsOf = typeof p === 'string' ? model.tokenize(p) : p;
      if (idsOf.length < 2) return { ids: idsOf, list: idsOf.map(() => null) };
      const s = await model.score(idsOf, { logprobs: k });
      return { ids: idsOf, list: [null, ...s.tokens] as (TokenLogprob | null)[] };
    };
    try {
      if (b.stream) {
        reply.hijack();
        const raw = reply.raw;
        raw.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' }); // keep-alive as the client asked
        raw.flushHeaders(); // the client sees the response start now, not at the first token
        const events = new EventWriter(raw, onWrite);
        const send = (obj: unknown) => events.send(JSON.stringify(obj));
        // A token's event is the same object each time but for its text and logprobs: its JSON
        // is built from the serialized parts rather than serialized whole.
        const head = JSON.stringify(base).slice(0, -1) + ',"choices":[{"text":';
        let completionTokens = 0;
        let promptCount = 0;
        try {
          await Promise.all(
          list.flatMap((p, pi) =>
            Array.from({ length: n }, async (_, j) => {
              const index = pi * n + j;
              if (echo) {
                const e = k !== undefined ? await promptLogprobs(p) : undefined;
                const ptext = typeof p === 'string' ? p : model.decode(p);
                await send({ ...base, choices: [{ text: ptext, index, logprobs: e ? legacyLogprobs(e.list, e.ids.map(text), 0) : null, finish_reason: null }] });
              }
              const s = model.stream(p, opts(index));
              let offset = 0;
              for await (const c of s as AsyncIterable<TokenChunk>) {
                const lp = c.logprob ? legacyLogprobs([c.logprob], [c.logprob.text], offset) : null;
                offset += c.logprob ? c.logprob.text.length : 0;
                const behind = events.send(`${head}${JSON.stringify(c.text)},"index":${index},"logprobs":${lp ? JSON.stringify(lp) : 'null'},"finish_reason":null}]}`);
                if (behind) await behind;
              }
              const r = await s.result;
              observe(r);
              completionTokens += r.tokens.length;
              if (j === 0) promptCount += r.promptTokens.length;
              if (r.stopReason !== 'aborted') await send({ ...base, choices: [{ text: '', index, logprobs: null, finish_reason: FINISH_REASON[r.stopReason] }] });
            }),
          ),
          );
        } catch (e) {
          // Past the headers an error travels as an event, then the stream ends.
          controller.abort();
          send(apiError((e as Error).message, 'server_error', null, (e as { code?: string }).code ?? null));
          events.end();
          requests.inc({ route: '/v1/completions', status: '200' });
          return;
        }
        promptTokens.inc(promptCount);
        if (b.stream_options?.include_usage) send({ ...base, choices: [], usage: { prompt_tokens: promptCount, completion_tokens: completionTokens, total_tokens: promptCount + completionTokens } });
        events.end();
        requests.inc({ route: '/v1/completions', status: '200' }); // a hijacked reply skips onResponse
        return;
      }
      const results: { r: GenerateResult; index: number; p: string | number[] }[] = await Promise.all(
        list.flatMap((p, pi) => Array.from({ length: n }, async (_, j) => ({ r: await model.generate(p, opts(pi * n + j)), index: pi * n + j, p }))),
      );
      results.forEach(({ r }) => observe(r));
      const choices = await Promise.all(
        results.map(async ({ r, index, p }) => {
          let out = r.text;
          let logprobs = null;
          if (k !== undefined) {
            const gen = r.logprobs ?? [];
            logprobs = legacyLogprobs(gen, gen.map((l) => l.text), 0);
          }
          if (echo) {
            const ptext = typeof p === 'string' ? p : model.decode(p);
            out = ptext + r.text;
            if (k !== undefined) {
              const e = await promptLogprobs(p);
              const gen = r.logprobs ?? [];
              logprobs = legacyLogprobs([...e.list, ...gen], [...e.ids.map(text), ...gen.map((l) => l.text)], 0);
            }
          }
          return { text: out, index, logprobs, finish_reason: FINISH_REASON[r.stopReason] };
        }),
      );
      const promptCount = results.filter((_, i) => i % n === 0).reduce((s, x) => s + x.r.promptTokens.length, 0);
      const completionTokens = results.reduce((s, x) => s + x.r.tokens.length, 0);
      promptTokens.inc(promptCount);
      return { ...base, choices, usage: { prompt_tokens: promptCount, completion_tokens: completionTokens, total_tokens: promptCount + completionTokens } };
    } finally {
      inFlight.delete(controller);
      sequences -= need;
    }
  });

  await app.listen({ host, port });
  const addr = app.server.address();
  const url = typeof addr === 'object' && addr ? `http://${addr.family === 'IPv6' ? `[${addr.address}]` : addr.address}:${addr.port}` : String(addr);
  return {
    url,
    model,
    async close(timeoutMs = 30_000) {
      const timer = setTimeout(() => inFlight.forEach((c) => c.abort()), timeoutMs);
      try {
        await app.close();
      } finally {
        clearTimeout(timer);
      }
    },
  };
}
