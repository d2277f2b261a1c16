// Client-side refusals, against a real Redis and worker: forged and tampered
// entries are added to the session's real reply stream next to the worker's.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import {
  ALG_SK, Client, ConfigError, ReplyTimeout, RequestRejected, decodeMsgpack, encodeJson, encodeMsgpack,
} from '../src/index.js';
import { RedisTransport } from '../src/redis.js';
import { collectingLogger, startRig, waitFor } from './harness.mjs';

let rig;
let transport;
before(async () => {
  rig = await startRig();
  transport = await RedisTransport.connect(rig.url, { prefix: rig.prefix });
});
after(async () => {
  await transport?.close();
  await rig?.stop();
});

/**
 * The Redis transport with a gate on reading replies: while held, the session's
 * reader reads nothing, so a test can line up entries that then arrive in one batch.
 */
class GatedTransport extends RedisTransport {
  constructor(redis, options) {
    super(redis, options);
    this.batches = [];
    this.open();
  }

  hold() { this._gate = new Promise((resolve) => { this._release = resolve; }); }

  open() { this._gate = null; this._release?.(); }

  async _read(conn, key, from) {
    while (this._gate) await this._gate;
    const batch = await super._read(conn, key, from);
    this.batches.push(batch.length);
    return batch;
  }
}

async function openSession(t, { encoding = 'e', gated = false } = {}) {
  const logger = collectingLogger();
  let client = new Client(transport, { kid: rig.kid, encoding, logger });
  let session;
  let tr = transport;
  if (gated) {
    // The handshake goes through ungated; the session's reader starts held, so
    // its first read (from the stream's start) waits for tr.open().
    const grant = await client.handshake();
    tr = new GatedTransport(transport.redis, { prefix: rig.prefix });
    tr.hold();
    client = new Client(tr, { kid: rig.kid, encoding, logger });
    session = await client.session({ grant, alg: ALG_SK });
  } else {
    session = await client.session({ alg: ALG_SK });
  }
  t.after(() => session.close());
  return { session, logger, tr };
}

const replyKey = (sid) => `${rig.prefix}:{${sid}}:reply`;
const addReply = (sid, field, bytes) => rig.redis.sendCommand(['XADD', replyKey(sid), '*', field, Buffer.from(bytes)]);
const notice = (sid, mid, code) => encodeMsgpack({ v: 1, alg: ALG_SK, sid, mid, status: 'rejected', code });

/** The worker's own reply entries for `mid` (decoded envelopes). */
async function genuine(sid, mid) {
  const entries = await rig.redis.sendCommand(['XRANGE', replyKey(sid), '-', '+'], { returnBuffers: true });
  return entries.map(([, f]) => decodeMsgpack(new Uint8Array(f[1]))).filter((env) => env.mid === mid && env.status !== 'rejected');
}

async function next(session) {
  const { value } = await session.replies()[Symbol.asyncIterator]().next();
  return value;
}

test('a service key that does not match the pinned kid is refused', async () => {
  /** P:config's key hashes to another kid than the pin: ConfigError, no handshake. */
  const client = new Client(transport, { kid: 'ab'.repeat(32) });
  await assert.rejects(client.session(), (err) => err instanceof ConfigError && /pinned kid/.test(err.message));
});

test('a given service public key must match the pinned kid too', async () => {
  /** A PEM and a kid that disagree are refused before anything is sent. */
  const client = new Client(transport, { kid: 'cd'.repeat(32), servicePublicKey: rig.servicePublicKeyPem });
  await assert.rejects(client.handshake(), ConfigError);
});

test('a forged replay notice for our own mid is ignored', async (t) => {
  /** Anyone who can add entries could send it; waiting goes on and the real reply wins. */
  const { session } = await openSession(t);
  const mid = await session.submit('sleep', { ms: 300 });
  await addReply(session.sid, 'e', notice(session.sid, mid, 'replay'));
  const result = await next(session);
  assert.deepEqual([mid, 'ok', { slept: 300 }], [result.mid, result.status, result.value]);
});

test('a forged notice alone ends the wait with RequestRejected', async (t) => {
  /** Notices are unauthenticated hints to stop waiting, as in the Python client. */
  const { session } = await openSession(t);
  const mid = await session.submit('sleep', { ms: 300 });
  await addReply(session.sid, 'e', notice(session.sid, mid, 'expired'));
  const result = await next(session);
  assert.equal(result.mid, mid);
  assert.throws(() => result.unwrap(), (err) => err instanceof RequestRejected && err.code === 'expired');
});

test('an authenticated reply wins over a notice added before it', async (t) => {
  /** Notice first, then the worker's reply, read in one batch: the reply is the result. */
  const { session, tr } = await openSession(t, { gated: true });
  const mid = await session.submit('sleep', { ms: 200 });
  await addReply(session.sid, 'e', notice(session.sid, mid, 'session_unknown'));
  await waitFor(async () => (await genuine(session.sid, mid)).length === 1, { what: 'the reply' });
  tr.open();
  const result = await next(session);
  assert.deepEqual(['ok', { slept: 200 }], [result.status, result.value]);
  // one batch: the handshake's reply, our reply and the notice
  assert.deepEqual([3], tr.batches.slice(0, 1));
});

test('an authenticated reply wins over a notice added after it', async (t) => {
  /** The worker's reply, then a forged notice, in one batch: the reply is the result. */
  const { session, tr } = await openSession(t, { gated: true });
  const mid = await session.submit('echo', { a: 1 });
  await waitFor(async () => (await genuine(session.sid, mid)).length === 1, { what: 'the reply' });
  await addReply(session.sid, 'e', notice(session.sid, mid, 'delivery_limit'));
  tr.open();
  const result = await next(session);
  assert.deepEqual(['ok', { a: 1 }], [result.status, result.value]);
  // one batch: the handshake's reply, our reply and the notice
  assert.deepEqual([3], tr.batches.slice(0, 1));
});

test('a tampered reply is logged and ignored, and the genuine one is used', async (t) => {
  /** Another request's genuine reply relabelled with our mid fails to open (AAD). */
  const { session, logger } = await openSession(t);
  const other = await session.submit('echo', { other: true });
  await next(session);
  const [stolen] = await genuine(session.sid, other);
  const mid = await session.submit('sleep', { ms: 300 });
  await addReply(session.sid, 'e', encodeMsgpack({ ...stolen, mid }));
  const result = await next(session);
  assert.deepEqual([mid, 'ok'], [result.mid, result.status]);
  assert.deepEqual([{ event: 'reply_unauthentic', session_id: session.sid, message_id: mid }],
    logger.events.map(({ event, session_id, message_id }) => ({ event, session_id, message_id })));
});

test('a reply whose tag does not verify does not end the wait', async (t) => {
  /** A forged ok reply (a flipped tag bit) alone: the request times out, logged once. */
  const { session, logger } = await openSession(t);
  const other = await session.submit('echo', { x: 1 });
  await next(session);
  const [real] = await genuine(session.sid, other);
  const pending = session.request('sleep', { ms: 3000 }, { timeoutMs: 1500 });
  // The request's mid is not known to the caller of request(): the forgery targets
  // whatever the session waits for, read from its waiters.
  const mid = await waitFor(async () => [...session._reader.waiters.keys()][0], { what: 'the request' });
  const tag = Uint8Array.from(real.authTag);
  tag[0] ^= 1;
  await addReply(session.sid, 'e', encodeMsgpack({ ...real, mid, authTag: tag }));
  await assert.rejects(pending, ReplyTimeout);
  assert.deepEqual(['reply_unauthentic'], logger.events.map((e) => e.event));
});

test('malformed reply entries are logged and skipped', async (t) => {
  /** Two fields, duplicate keys, a float v, bad base64: each is refused by the strict decoders. */
  const { session, logger } = await openSession(t, { encoding: 'j' });
  const mid = await session.submit('sleep', { ms: 300 });
  const sid = session.sid;
  const base = `"v":1,"alg":"${ALG_SK}","sid":"${sid}","mid":"${mid}","status":"rejected","code":"expired"`;
  await rig.redis.sendCommand(['XADD', replyKey(sid), '*', 'j', `{${base}}`, 'e', 'x']);
  await addReply(sid, 'j', new TextEncoder().encode(`{${base},"code":"expired"}`));
  await addReply(sid, 'j', new TextEncoder().encode(`{${base.replace('"v":1', '"v":1.0')}}`));
  await addReply(sid, 'j', encodeJson({ v: 1, alg: ALG_SK, sid, mid, status: 'ok', iv: 'AAAAAAAAAAAAAAA=', encryptedData: '', authTag: 'AAAAAAAAAAAAAAAAAAAAAA==' }));
  const result = await next(session);
  assert.deepEqual([mid, 'ok'], [result.mid, result.status]);
  assert.deepEqual(Array(4).fill('reply_malformed'), logger.events.map((e) => e.event));
});
