// The client: pin the service key, handshake, send requests, await replies.
//
//   const client = new Client(transport, { kid: PINNED_KID });
//   const session = await client.session();          // handshake; reader running
//   const result = await session.request('echo', { x: 1 });
//   await session.close();
//
// One reader per session reads the session's reply stream (through the transport)
// and hands each reply to the request waiting for its mid; replies to submit()
// go to session.replies(). Validation and errors follow the Python client
// (worker/client.py): strict decoding; a reply that fails to open is logged and
// ignored while waiting goes on; a `replay` notice for one of our own mids is
// ignored (it can only come from a copy of our entry); an authenticated reply
// wins over a notice for the same mid.

import { CODECS, DecodeError, b64decode, unwrapFloats, isPlainMap } from './codec.js';
import {
  ALG_RSA, ALG_SK, HANDSHAKE_TYPE, KEY_SIZE, OpenError, deriveSessionKey, importRsaPublicKey,
  newId, randomBytes, x25519KeyPair,
} from './crypto.js';
import {
  ClientError, ConfigError, ProtocolError, RemoteError, ReplyTimeout, RequestRejected,
} from './errors.js';
import { HEX64, TYPE_RE, decodeReplyEntry, encodeEnvelope, openReply, sealRequest } from './protocol.js';

/** Writes one JSON line per warning to the console; no key or plaintext is ever given. */
export const consoleLogger = Object.freeze({
  warn(event, fields = {}) { console.warn(JSON.stringify({ level: 'warning', event, ...fields })); },
});

/** A reply as session.replies() yields it. */
export class Result {
  constructor({ mid, type, status, value = null, code = null, message = null }) {
    Object.assign(this, { mid, type, status, value, code, message });
    Object.freeze(this);
  }

  /** The value of an `ok` result; throws RemoteError or RequestRejected otherwise. */
  unwrap() {
    if (this.status === 'ok') return this.value;
    if (this.status === 'error') throw new RemoteError(this.code, this.message, { messageId: this.mid });
    throw new RequestRejected(this.code ?? 'rejected', { messageId: this.mid });
  }
}

function toResult(r) {
  return new Result({ ...r, value: r.status === 'ok' ? unwrapFloats(r.value) : null });
}

function checkAlg(alg) {
  if (alg !== ALG_SK && alg !== ALG_RSA) throw new TypeError(`alg must be ${ALG_SK} or ${ALG_RSA}`);
}

function checkEncoding(encoding) {
  if (encoding !== 'e' && encoding !== 'j') throw new TypeError("encoding must be 'e' (MessagePack) or 'j' (JSON)");
}

/** Run `fn(signal)` with a deadline; ReplyTimeout when it passes. */
async function withDeadline(timeoutMs, mid, fn) {
  const ctl = new AbortController();
  let timer;
  const expired = new Promise((_, reject) => {
    timer = setTimeout(() => {
      ctl.abort();
      reject(new ReplyTimeout(`no reply within ${timeoutMs / 1000} s`, { messageId: mid() }));
    }, timeoutMs);
  });
  try {
    return await Promise.race([fn(ctl.signal), expired]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Reads one session's reply stream and settles waiters by mid. Entries are taken
 * in batches (what the transport has at hand); within a batch an authenticated
 * reply wins over a notice for the same mid, and once a waiter has an
 * authenticated result no notice replaces it.
 */
class ReplyReader {
  constructor(transport, sid, logger) {
    this.transport = transport;
    this.sid = sid;
    this.logger = logger;
    this.waiters = new Map();
    this.abort = new AbortController();
    this.failure = null;
    this.done = this._run();
  }

  async _run() {
    try {
      for await (const batch of this.transport.subscribe(this.sid, { after: '0-0', signal: this.abort.signal })) {
        await this._batch(batch);
      }
      if (!this.abort.signal.aborted) throw new ClientError('the reply stream ended');
    } catch (err) {
      if (!this.abort.signal.aborted) {
        this.failure = err instanceof ClientError ? err : new ClientError(`the reply reader stopped: ${err.message}`);
        for (const w of this.waiters.values()) w.reject(this.failure);
        this.waiters.clear();
      }
    }
  }

  async _batch(batch) {
    const touched = new Set();
    for (const entry of batch) {
      let reply;
      try {
        reply = decodeReplyEntry(entry.fields);
      } catch (err) {
        if (!(err instanceof DecodeError)) throw err;
        this.logger.warn('reply_malformed', { session_id: this.sid, entry_id: entry.id });
        continue;
      }
      const waiter = this.waiters.get(reply.mid);
      if (waiter === undefined || reply.sid !== this.sid || waiter.authentic) continue;
      if (reply.status === 'rejected' && reply.code === 'replay') continue; // a copy of our own entry
      let result;
      try {
        result = await openReply(waiter.sealed, reply);
      } catch (err) {
        if (!(err instanceof OpenError)) throw err;
        this.logger.warn('reply_unauthentic', { session_id: this.sid, message_id: reply.mid, entry_id: entry.id });
        continue;
      }
      if (result.authenticated) {
        waiter.authentic = result;
      } else {
        waiter.notice = result;
      }
      touched.add(waiter);
    }
    for (const waiter of touched) {
      this.waiters.delete(waiter.sealed.mid);
      waiter.resolve(toResult(waiter.authentic ?? waiter.notice));
    }
  }

  /** Register interest in `sealed.mid` before sending it; returns the waiter. */
  expect(sealed, onResult) {
    if (this.failure) throw this.failure;
    let resolve; let reject;
    const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
    promise.catch(() => {}); // a submit()'s waiter is never awaited
    const waiter = { sealed, authentic: null, notice: null, promise, resolve: onResult ?? resolve, reject };
    this.waiters.set(sealed.mid, waiter);
    return waiter;
  }

  forget(mid) { this.waiters.delete(mid); }

  async close(reason) {
    this.abort.abort();
    for (const w of this.waiters.values()) w.reject(reason);
    this.waiters.clear();
    await this.done;
  }
}

/**
 * A producer/consumer of encrypted requests over one transport (RedisTransport
 * in Node, GatewayTransport in Node or a browser). Pin the service key by `kid`
 * (64 hex chars, what `sealstream keygen` printed), or give its PEM, or both.
 */
export class Client {
  constructor(transport, { kid, servicePublicKey, encoding = 'e', logger = consoleLogger } = {}) {
    if (kid === undefined && servicePublicKey === undefined) {
      throw new ConfigError('Client needs the pinned service kid or service public key');
    }
    if (kid !== undefined && (typeof kid !== 'string' || !HEX64.test(kid))) {
      throw new ConfigError('kid must be 64 lowercase hex characters');
    }
    checkEncoding(encoding);
    if (transport.encodings && !transport.encodings.includes(encoding)) {
      throw new ConfigError(`this transport carries only the ${transport.encodings.join('/')} encoding`);
    }
    this.transport = transport;
    this.kid = kid;
    this.encoding = encoding;
    this.logger = logger;
    this._servicePem = servicePublicKey;
    this._service = null;
  }

  /** The pinned service public key (from P:config unless given); ConfigError on a mismatch. */
  async serviceKey() {
    if (this._service) return this._service;
    let pem = this._servicePem;
    if (pem === undefined) {
      const config = await this.transport.config();
      pem = config.servicePublicKey;
      if (typeof pem !== 'string') throw new ConfigError('no service public key: no worker has published the config yet (is the prefix right?)');
    }
    let key;
    try {
      key = await importRsaPublicKey(pem, 'the service public key');
    } catch (err) {
      throw new ConfigError(err.message);
    }
    if (this.kid !== undefined && key.kid !== this.kid) {
      throw new ConfigError('the service public key does not match the pinned kid');
    }
    this._service = key;
    return key;
  }

  /**
   * Run the protocol's handshake; returns a grant { sid, publicKeyPem, sessionKey,
   * expiresAt }. Throws RequestRejected, RemoteError, ReplyTimeout, ProtocolError.
   */
  async handshake({ ttl = 3600, timeoutMs = 30000 } = {}) {
    const service = await this.serviceKey();
    const codec = CODECS[this.encoding];
    const sid = newId();
    const kb = randomBytes(KEY_SIZE);
    const ec = await x25519KeyPair();
    const sealed = await sealRequest({
      alg: ALG_RSA, sid, type: HANDSHAKE_TYPE, codec, rsa: service, key: kb, kid: service.kid,
      payload: { clientEphemeral: codec.wireBytes(ec.raw), ttl },
    });
    const reader = new ReplyReader(this.transport, sid, this.logger);
    let result;
    try {
      const waiter = reader.expect(sealed);
      result = await withDeadline(timeoutMs, () => sealed.mid, async (signal) => {
        await this.transport.send(codec.field, encodeEnvelope(sealed), sealed.mid, { signal });
        return waiter.promise;
      });
    } finally {
      await reader.close(new ClientError('handshake ended'));
    }
    const value = result.unwrap();
    const bad = (what) => new ProtocolError(`the handshake reply is not the protocol's: ${what}`);
    if (!isPlainMap(value)) throw bad('not a map');
    const keys = Object.keys(value).sort().join(',');
    if (keys !== 'expiresAt,publicKey,serverEphemeral,sessionId') throw bad(`fields ${keys}`);
    if (value.sessionId !== sid) throw bad('another session');
    if (!Number.isSafeInteger(value.expiresAt)) throw bad('expiresAt is not an integer');
    let ew;
    try { ew = codec.bytes(value.serverEphemeral, 'serverEphemeral'); } catch { throw bad('serverEphemeral'); }
    if (ew.length !== 32) throw bad('serverEphemeral is not 32 bytes');
    await importRsaPublicKey(value.publicKey, 'the session public key');
    const sessionKey = await deriveSessionKey(kb, ec.privateKey, ec.raw, ew, sid);
    return Object.freeze({ sid, publicKeyPem: value.publicKey, sessionKey, expiresAt: value.expiresAt });
  }

  /**
   * Open a session (a handshake unless `grant` is given) with its reply reader.
   * At most `maxInFlight` requests wait for replies at once (keep it under the
   * workers' SEALSTREAM_REPLY_MAXLEN, 1,000).
   */
  async session({ grant, alg = ALG_SK, ttl = 3600, timeoutMs = 30000, maxInFlight = 500 } = {}) {
    checkAlg(alg);
    if (!Number.isInteger(maxInFlight) || maxInFlight < 1) throw new TypeError('maxInFlight must be at least 1');
    const g = grant ?? await this.handshake({ ttl, timeoutMs });
    const rsa = await importRsaPublicKey(g.publicKeyPem, 'the session public key');
    return new Session(this, g, rsa, { alg, maxInFlight });
  }
}

/** An open session: send requests, receive their replies. Close it when done. */
export class Session {
  constructor(client, grant, rsa, { alg, maxInFlight }) {
    this.client = client;
    this.grant = grant;
    this.sid = grant.sid;
    this.alg = alg;
    this._rsa = rsa;
    this._reader = new ReplyReader(client.transport, grant.sid, client.logger);
    this._free = maxInFlight;
    this._slotWaiters = [];
    this._results = [];
    this._resultWaiters = [];
    this._closed = false;
  }

  /** Requests sent whose reply has not arrived. */
  get outstanding() { return this._reader.waiters.size; }

  async _acquire(signal) {
    if (this._free > 0) { this._free -= 1; return; }
    await new Promise((resolve, reject) => {
      const entry = { resolve, reject };
      this._slotWaiters.push(entry);
      signal?.addEventListener('abort', () => {
        const i = this._slotWaiters.indexOf(entry);
        if (i >= 0) { this._slotWaiters.splice(i, 1); reject(new ClientError('aborted')); }
      }, { once: true });
    });
  }

  _release() {
    const next = this._slotWaiters.shift();
    if (next) next.resolve(); else this._free += 1;
  }

  async _send(type, payload, { alg, encoding, signal, onResult }) {
    if (this._closed) throw new ClientError('the session is closed');
    alg = alg ?? this.alg;
    encoding = encoding ?? this.client.encoding;
    checkAlg(alg);
    checkEncoding(encoding);
    if (typeof type !== 'string' || !TYPE_RE.test(type)) throw new TypeError('type must match [A-Za-z0-9_.:-]{1,64}');
    const codec = CODECS[encoding];
    codec.encode(payload); // refuse what the encoding cannot carry before taking a slot
    await this._acquire(signal);
    let waiter;
    try {
      // ts is taken when the request really goes out, after waiting for a slot.
      const sealed = await sealRequest({
        alg, sid: this.sid, type, payload, codec,
        rsa: alg === ALG_RSA ? this._rsa : undefined,
        ks: alg === ALG_SK ? this.grant.sessionKey : undefined,
      });
      waiter = this._reader.expect(sealed, onResult);
      await this.client.transport.send(codec.field, encodeEnvelope(sealed), sealed.mid, { signal });
      return waiter;
    } catch (err) {
      if (waiter) this._reader.forget(waiter.sealed.mid);
      this._release();
      throw err;
    }
  }

  /**
   * Send a request and return its result. Throws RemoteError for an `error`
   * reply, RequestRejected for a notice, ReplyTimeout when nothing comes within
   * `timeoutMs` (which covers the send too).
   */
  async request(type, payload, { timeoutMs = 30000, alg, encoding } = {}) {
    let waiter = null;
    try {
      const result = await withDeadline(timeoutMs, () => waiter?.sealed.mid ?? null, async (signal) => {
        const w = await this._send(type, payload, { alg, encoding, signal });
        if (signal.aborted) { // the deadline passed while sending
          this._reader.forget(w.sealed.mid);
          this._release();
          return null;
        }
        waiter = w;
        return w.promise;
      });
      return result.unwrap();
    } finally {
      if (waiter) {
        this._reader.forget(waiter.sealed.mid);
        this._release();
      }
    }
  }

  /** Send a request whose reply will come from replies(); returns its mid. */
  async submit(type, payload, { alg, encoding } = {}) {
    const waiter = await this._send(type, payload, {
      alg, encoding,
      onResult: (result) => {
        this._release();
        const next = this._resultWaiters.shift();
        if (next) next.resolve({ value: result, done: false }); else this._results.push(result);
      },
    });
    return waiter.sealed.mid;
  }

  /** Results of submitted requests, in the order their replies arrive. */
  replies() {
    const self = this;
    return {
      [Symbol.asyncIterator]() { return this; },
      next() {
        if (self._results.length) return Promise.resolve({ value: self._results.shift(), done: false });
        if (self._closed) return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve, reject) => self._resultWaiters.push({ resolve, reject }));
      },
      return() { return Promise.resolve({ value: undefined, done: true }); },
    };
  }

  /** Stop the reader; requests still waiting fail with ClientError. */
  async close() {
    if (this._closed) return;
    this._closed = true;
    await this._reader.close(new ClientError('the session is closed'));
    for (const w of this._resultWaiters.splice(0)) w.resolve({ value: undefined, done: true });
  }
}

export { b64decode };
