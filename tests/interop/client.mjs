#!/usr/bin/env node
// Conformance run of the JavaScript client package (clients/js) against a worker,
// for the sealstream wire protocol, version 1. It began as an independent client
// written from PROTOCOL.md alone; its codecs and crypto grew into clients/js,
// which this script now uses: the high-level Client for the handshake and the
// echo/unknown_type steps, the package's protocol module for the tamper and
// replay steps, which need envelopes a well-behaved client never sends.
//
// Configuration (environment):
//   SEALSTREAM_REDIS_URL                 redis://host:port/db            (required)
//   SEALSTREAM_PREFIX                    key prefix P                    (default "sealstream")
//   SEALSTREAM_SERVICE_PUBLIC_KEY_FILE   service public key, PEM SPKI    (required)
//   SEALSTREAM_KID                       pinned kid, 64 lowercase hex    (required)
//   SEALSTREAM_TIMEOUT_MS                per-reply wait                  (default 15000)
//
// Output: one JSON object per line per step, then {"done":true,"passed":N,"failed":M}.
// Exit: 0 all steps passed, 1 some step failed, 2 configuration / key pin refused.

import fs from 'node:fs';
import { isDeepStrictEqual } from 'node:util';
import { Client, RemoteError } from 'sealstream-client';
import {
  ALG_RSA, ALG_SK, CODECS, decodeReplyEntry, encodeEnvelope, importRsaPublicKey, openReply, sealRequest,
} from 'sealstream-client/protocol';
import { RedisTransport } from 'sealstream-client/redis';

const HEX64 = /^[0-9a-f]{64}$/;
const ECHO_PAYLOAD = { hello: 'node', n: 42, nested: { list: [1, 2, 3] } };

function out(obj) { process.stdout.write(`${JSON.stringify(obj)}\n`); }

const results = [];

// Wait for the first reply entry for `sealed.mid` after entry `after`, decode it
// strictly (a malformed entry fails the step loudly) and open it.
async function awaitReply(transport, sealed, { after = '0-0', timeoutMs }) {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), timeoutMs);
  try {
    for await (const batch of transport.subscribe(sealed.sid, { after, signal: ctl.signal })) {
      for (const entry of batch) {
        const reply = decodeReplyEntry(entry.fields);
        if (reply.mid !== sealed.mid) continue;
        if (reply.field !== sealed.codec.field) throw new Error(`reply uses field ${reply.field}, request used ${sealed.codec.field}`);
        return { ...(await openReply(sealed, reply)), entryId: entry.id };
      }
    }
  } finally {
    clearTimeout(timer);
    ctl.abort();
  }
  throw new Error(`timeout after ${timeoutMs} ms waiting for the reply to mid ${sealed.mid}`);
}

async function main() {
  const record = (obj) => { results.push(obj.ok); out(obj); };
  const refuse = (msg, extra = {}) => { out({ step: 'config', ok: false, error: msg, ...extra }); process.exit(2); };

  const url = process.env.SEALSTREAM_REDIS_URL;
  const prefix = process.env.SEALSTREAM_PREFIX || 'sealstream';
  const pemFile = process.env.SEALSTREAM_SERVICE_PUBLIC_KEY_FILE;
  const pin = (process.env.SEALSTREAM_KID || '').trim().toLowerCase();
  const timeoutMs = process.env.SEALSTREAM_TIMEOUT_MS ? Number(process.env.SEALSTREAM_TIMEOUT_MS) : 15000;
  if (!url) refuse('SEALSTREAM_REDIS_URL is not set');
  if (!pemFile) refuse('SEALSTREAM_SERVICE_PUBLIC_KEY_FILE is not set');
  if (!HEX64.test(pin)) refuse('SEALSTREAM_KID must be 64 hex characters');
  if (!Number.isFinite(timeoutMs) || timeoutMs <= 0) refuse('SEALSTREAM_TIMEOUT_MS must be a positive number');

  let pem;
  let service;
  try {
    pem = fs.readFileSync(pemFile, 'utf8');
    service = await importRsaPublicKey(pem, 'the service public key');
  } catch (e) {
    refuse(`cannot load service public key: ${e.message}`);
  }
  if (service.kid !== pin) refuse('service public key does not match the pinned kid', { fileKid: service.kid, pinnedKid: pin });

  let transport;
  try {
    transport = await RedisTransport.connect(url, { prefix });
  } catch (e) {
    out({ step: 'connect', ok: false, error: `cannot connect to redis: ${e.message}` });
    out({ done: true, passed: 0, failed: 1 });
    process.exit(1);
  }
  const config = await transport.config();
  if (config.kid !== pin) refuse(`${prefix}:config kid does not equal the pinned kid`, { configKid: config.kid ?? null, pinnedKid: pin });
  const shards = await transport.shards();
  let configKeyMatches = null;
  if (config.servicePublicKey !== undefined) {
    configKeyMatches = await importRsaPublicKey(config.servicePublicKey).then((k) => k.kid === pin, () => false);
  }
  record({ step: 'config', ok: true, kid: pin, shards, configServicePublicKeyMatchesPin: configKeyMatches });

  // a. handshake (JSON entries)
  const client = new Client(transport, { kid: pin, servicePublicKey: pem, encoding: 'j' });
  let session = null;
  try {
    const t0 = Date.now();
    const grant = await client.handshake({ ttl: 600, timeoutMs });
    session = await client.session({ grant });
    record({ step: 'handshake', encoding: 'j', alg: ALG_RSA, ok: true, sid: grant.sid, ttlMs: grant.expiresAt - t0 });
  } catch (e) {
    record({ step: 'handshake', encoding: 'j', alg: ALG_RSA, ok: false, error: e.message });
  }
  const needSession = (base) => {
    if (!session) { record({ ...base, ok: false, error: 'no session (handshake failed)' }); return false; }
    return true;
  };

  // b/c/d. echo, both algs, both encodings
  for (const encoding of ['j', 'e']) {
    for (const alg of [ALG_RSA, ALG_SK]) {
      const base = { step: 'echo', encoding, alg };
      if (!needSession(base)) continue;
      try {
        const result = await session.request('echo', ECHO_PAYLOAD, { alg, encoding, timeoutMs });
        if (!isDeepStrictEqual(result, ECHO_PAYLOAD)) throw new Error(`echo result differs: ${JSON.stringify(result)}`);
        record({ ...base, ok: true, status: 'ok' });
      } catch (e) {
        record({ ...base, ok: false, error: e.message });
      }
    }
  }

  // e. unknown handler -> error / unknown_type (SK mode)
  for (const encoding of ['j', 'e']) {
    const base = { step: 'unknown_type', encoding, alg: ALG_SK };
    if (!needSession(base)) continue;
    try {
      await session.request('nope', { x: 1 }, { alg: ALG_SK, encoding, timeoutMs });
      record({ ...base, ok: false, error: 'got ok, want error/unknown_type' });
    } catch (e) {
      const ok = e instanceof RemoteError && e.code === 'unknown_type';
      record({ ...base, ok, ...(ok ? { status: 'error', code: e.code, message: e.remoteMessage } : { error: e.message }) });
    }
  }

  // f. tamper: one bit of authTag flipped -> rejected/rejected; then the untampered envelope
  //    with the same mid must still be accepted (a forgery cannot burn a mid).
  // g. replay: the accepted envelope added again -> rejected/replay.
  const accepted = {};
  for (const encoding of ['j', 'e']) {
    const base = { step: 'tamper', encoding, alg: ALG_SK };
    if (!needSession(base)) continue;
    try {
      const codec = CODECS[encoding];
      const sealed = await sealRequest({ alg: ALG_SK, sid: session.sid, type: 'echo', payload: ECHO_PAYLOAD, codec, ks: session.grant.sessionKey });
      const badTag = Uint8Array.from(codec.bytes(sealed.env.authTag, 'authTag'));
      badTag[0] ^= 0x01;
      await transport.send(codec.field, codec.encode({ ...sealed.env, authTag: codec.wireBytes(badTag) }), sealed.mid);
      const rep = await awaitReply(transport, sealed, { timeoutMs });
      if (rep.status !== 'rejected' || rep.code !== 'rejected') throw new Error(`tampered request got status ${rep.status} code ${rep.code}, want rejected/rejected`);
      await transport.send(codec.field, encodeEnvelope(sealed), sealed.mid);
      const rep2 = await awaitReply(transport, sealed, { after: rep.entryId, timeoutMs });
      if (rep2.status !== 'ok' || !isDeepStrictEqual(rep2.value, ECHO_PAYLOAD)) throw new Error(`untampered resend after rejection got status ${rep2.status} code ${rep2.code}, want ok echo (mid must not be burnt by a forgery)`);
      accepted[encoding] = { sealed, after: rep2.entryId };
      record({ ...base, ok: true, mid: sealed.mid, status: rep.status, code: rep.code, resendStatus: rep2.status });
    } catch (e) {
      record({ ...base, ok: false, error: e.message });
    }
  }
  {
    const base = { step: 'replay', encoding: 'j', alg: ALG_SK };
    if (needSession(base)) {
      try {
        if (!accepted.j) throw new Error('no accepted SK/j request to replay');
        const { sealed, after } = accepted.j;
        await transport.send('j', encodeEnvelope(sealed), sealed.mid);
        const rep = await awaitReply(transport, sealed, { after, timeoutMs });
        if (rep.status !== 'rejected' || rep.code !== 'replay') throw new Error(`replayed request got status ${rep.status} code ${rep.code}, want rejected/replay`);
        record({ ...base, ok: true, mid: sealed.mid, status: rep.status, code: rep.code });
      } catch (e) {
        record({ ...base, ok: false, error: e.message });
      }
    }
  }

  await session?.close();
  await transport.close().catch(() => {});
  const passed = results.filter(Boolean).length;
  const failed = results.length - passed;
  out({ done: true, passed, failed });
  process.exit(failed === 0 ? 0 : 1);
}

main().catch((e) => {
  out({ step: 'fatal', ok: false, error: e.message });
  const passed = results.filter(Boolean).length;
  out({ done: true, passed, failed: results.length - passed + 1 });
  process.exit(1);
});
