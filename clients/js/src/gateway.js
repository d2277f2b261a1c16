// The HTTP transport: through `sealstream gateway` with fetch and server-sent
// events, in browsers and in Node >= 20 alike. The gateway holds no key: it
// forwards sealed envelopes (JSON, the `j` encoding) and reply entries as they are.
//
//   const transport = new GatewayTransport('https://gateway.example');

import { b64decode } from './codec.js';
import { ClientError, GatewayRefused, ProtocolError } from './errors.js';

const sleep = (ms, signal) => new Promise((resolve) => {
  if (signal?.aborted) { resolve(); return; }
  const t = setTimeout(resolve, ms);
  signal?.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
});

function retryAfterMs(response, fallback) {
  const s = Number(response.headers.get('retry-after'));
  return Number.isFinite(s) && s > 0 ? Math.min(s, 60) * 1000 : fallback;
}

async function refusal(response, mid) {
  let code = 'http_error';
  let detail = response.statusText;
  try {
    const body = await response.json();
    if (typeof body.error === 'string') code = body.error;
    if (typeof body.detail === 'string') detail = body.detail;
  } catch { /* not JSON: keep the status text */ }
  return new GatewayRefused(response.status, code, detail, { messageId: mid });
}

/** Requests as POST /v1/requests, replies as GET /v1/replies/{sid} (server-sent events). */
export class GatewayTransport {
  /** `baseUrl`: the gateway's origin (and path prefix, if any). */
  constructor(baseUrl, { fetch: fetchImpl, reconnectMs = 1000 } = {}) {
    this.baseUrl = String(baseUrl).replace(/\/+$/, '');
    this.encodings = ['j'];
    this._fetch = fetchImpl ?? ((...args) => globalThis.fetch(...args));
    this._reconnectMs = reconnectMs;
  }

  /** GET /v1/config: { kid, servicePublicKey, shards }. */
  async config() {
    const response = await this._fetch(`${this.baseUrl}/v1/config`, { headers: { Accept: 'application/json' } });
    if (!response.ok) throw await refusal(response, null);
    const body = await response.json();
    return { kid: body.kid, servicePublicKey: body.servicePublicKey, shards: body.shards };
  }

  /**
   * POST one envelope; returns the request entry's id. Network failures and 5xx
   * answers are retried until `signal` aborts (a copy that reached Redis gets a
   * `replay` notice, which sessions ignore); 429 waits for Retry-After; other
   * 4xx answers are a GatewayRefused.
   */
  async send(field, bytes, mid, { signal } = {}) {
    if (field !== 'j') throw new ProtocolError('the gateway carries only the j (JSON) encoding');
    let delay = 100;
    for (;;) {
      let response;
      try {
        response = await this._fetch(`${this.baseUrl}/v1/requests`, {
          method: 'POST', body: bytes, signal, headers: { 'Content-Type': 'application/json' },
        });
      } catch (err) {
        if (signal?.aborted) throw new ClientError('aborted', { messageId: mid });
        await sleep(delay * (0.5 + Math.random()), signal);
        delay = Math.min(delay * 2, 2000);
        continue;
      }
      if (response.status === 202) return (await response.json()).id;
      if (response.status === 429 || response.status >= 500) {
        const wait = response.status === 429 ? retryAfterMs(response, delay) : delay;
        await response.body?.cancel().catch(() => {});
        await sleep(wait, signal);
        if (signal?.aborted) throw new ClientError('aborted', { messageId: mid });
        delay = Math.min(delay * 2, 2000);
        continue;
      }
      throw await refusal(response, mid);
    }
  }

  /**
   * Batches of reply entries after `after`: the events of one network read form a
   * batch. A dropped connection is resumed from the last event id (Last-Event-ID),
   * so no entry is lost or repeated. Ends when `signal` aborts.
   */
  async *subscribe(sid, { after = '0-0', signal } = {}) {
    let delay = this._reconnectMs;
    while (!signal?.aborted) {
      let response;
      try {
        response = await this._fetch(`${this.baseUrl}/v1/replies/${sid}?after=${encodeURIComponent(after)}`, {
          signal, headers: { Accept: 'text/event-stream', 'Last-Event-ID': after },
        });
      } catch {
        await sleep(delay, signal);
        continue;
      }
      if (response.status === 429 || response.status >= 500) {
        await response.body?.cancel().catch(() => {});
        await sleep(retryAfterMs(response, delay), signal);
        continue;
      }
      if (!response.ok) throw await refusal(response, null);
      const parser = new EventParser();
      const reader = response.body.getReader();
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          const batch = [];
          for (const ev of parser.push(value)) {
            if (ev.retry !== undefined) delay = ev.retry;
            if (ev.id === undefined || ev.data === undefined) continue;
            after = ev.id;
            batch.push({ id: ev.id, fields: parseFields(ev.data) });
          }
          if (batch.length) yield batch;
        }
      } catch (err) {
        if (err instanceof ProtocolError) throw err;
        // a dropped connection: resume below
      } finally {
        reader.cancel().catch(() => {});
      }
      await sleep(delay, signal);
    }
  }

  async close() {}
}

/** An event's data: the entry's fields, each value in base64. */
function parseFields(data) {
  let obj;
  try { obj = JSON.parse(data); } catch { return []; }
  if (obj === null || typeof obj !== 'object' || Array.isArray(obj)) return [];
  const fields = [];
  for (const [name, value] of Object.entries(obj)) {
    try { fields.push([name, b64decode(value)]); } catch { fields.push([name, new Uint8Array(0)]); }
  }
  return fields;
}

/** An incremental text/event-stream parser (the WHATWG HTML algorithm, in short). */
class EventParser {
  constructor() {
    this.decoder = new TextDecoder('utf-8');
    this.buffer = '';
    this.event = {};
  }

  *push(chunk) {
    this.buffer += this.decoder.decode(chunk, { stream: true });
    for (;;) {
      const m = /\r\n|\r|\n/.exec(this.buffer);
      if (!m) return;
      // A lone \r at the end may be half of \r\n: wait for more.
      if (m[0] === '\r' && m.index === this.buffer.length - 1) return;
      const line = this.buffer.slice(0, m.index);
      this.buffer = this.buffer.slice(m.index + m[0].length);
      if (line === '') {
        const ev = this.event;
        this.event = {};
        if (Object.keys(ev).length) yield ev;
        continue;
      }
      if (line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const name = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (name === 'data') this.event.data = this.event.data === undefined ? value : `${this.event.data}\n${value}`;
      else if (name === 'id' && !value.includes('\0')) this.event.id = value;
      else if (name === 'retry' && /^[0-9]+$/.test(value)) this.event.retry = Number(value);
      else if (name === 'event') this.event.type = value;
    }
  }
}
