#!/usr/bin/env node
// Independent third-party client for the sealstream wire protocol, version 1.
// Written from /work/shared/PROTOCOL.md alone (no worker code consulted).
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

import crypto from 'node:crypto';
import fs from 'node:fs';
import { pathToFileURL } from 'node:url';
import { isDeepStrictEqual } from 'node:util';
import { encode as msgpackEncode, decode as msgpackDecodeLenient } from '@msgpack/msgpack';
import { createClient } from 'redis';

// ---------------------------------------------------------------------------
// Protocol constants
// ---------------------------------------------------------------------------
export const PROTO = 'sealstream/1';
export const ALG_RSA = 'RSA-OAEP-256+A256GCM';
export const ALG_SK = 'SK+A256GCM';
export const HANDSHAKE_TYPE = 'sealstream.handshake';
const HEX32 = /^[0-9a-f]{32}$/;
const HEX64 = /^[0-9a-f]{64}$/;
const TYPE_RE = /^[A-Za-z0-9_.:-]{1,64}$/;
const STATUSES = new Set(['ok', 'error', 'rejected']);
const ERROR_CODES = new Set(['unknown_type', 'bad_payload', 'handler_error', 'timeout']);
const NOTICE_CODES = new Set(['rejected', 'session_unknown', 'expired', 'replay', 'delivery_limit']);
// SPKI DER header of an X25519 public key (RFC 8410): SEQ{SEQ{OID 1.3.101.110}, BIT STRING(33)}
const X25519_SPKI_PREFIX = Buffer.from('302a300506032b656e032100', 'hex');

export class ProtocolError extends Error {}
export class StrictDecodeError extends ProtocolError {}

// A number that was encoded on the wire as a float (JSON fraction/exponent, MessagePack
// float32/float64). Kept distinct so that "integers never given as float" can be enforced,
// and so that a float never deep-equals an integer.
export class WireFloat {
  constructor(value) { this.value = value; }
  toJSON() { return { float: this.value }; }
}

function defineOwn(obj, key, value) {
  // defineProperty, so that a key "__proto__" is an ordinary own property
  Object.defineProperty(obj, key, { value, enumerable: true, writable: true, configurable: true });
}

// ---------------------------------------------------------------------------
// Strict JSON (RFC 8259) decoder: one value, no trailing bytes, valid UTF-8, no BOM,
// no duplicate keys, no NaN/Infinity, numbers with fraction/exponent -> WireFloat.
// ---------------------------------------------------------------------------
const utf8Fatal = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

export function decodeStrictJson(bytes) {
  let text;
  try { text = utf8Fatal.decode(bytes); } catch { throw new StrictDecodeError('json: invalid UTF-8'); }
  let i = 0;
  const fail = (m) => { throw new StrictDecodeError(`json: ${m} at offset ${i}`); };
  const ws = () => {
    while (i < text.length) {
      const c = text.charCodeAt(i);
      if (c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d) i++; else break;
    }
  };
  const NUM = /-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/y;
  function value(depth) {
    if (depth > 128) fail('nesting too deep');
    ws();
    const c = text[i];
    if (c === '{') return object(depth);
    if (c === '[') return array(depth);
    if (c === '"') return string();
    if (c === '-' || (c >= '0' && c <= '9')) {
      NUM.lastIndex = i;
      const m = NUM.exec(text);
      if (!m) fail('bad number');
      i = NUM.lastIndex;
      if (m[1] !== undefined || m[2] !== undefined) {
        const f = Number(m[0]);
        if (!Number.isFinite(f)) fail('non-finite number');
        return new WireFloat(f);
      }
      const n = Number(m[0]);
      return Number.isSafeInteger(n) ? n : BigInt(m[0]);
    }
    for (const [lit, v] of [['true', true], ['false', false], ['null', null]]) {
      if (text.startsWith(lit, i)) { i += lit.length; return v; }
    }
    fail('unexpected token');
  }
  function object(depth) {
    i++;
    const obj = {};
    const seen = new Set();
    ws();
    if (text[i] === '}') { i++; return obj; }
    for (;;) {
      ws();
      if (text[i] !== '"') fail('expected string key');
      const k = string();
      if (seen.has(k)) fail(`duplicate key ${JSON.stringify(k)}`);
      seen.add(k);
      ws();
      if (text[i] !== ':') fail("expected ':'");
      i++;
      defineOwn(obj, k, value(depth + 1));
      ws();
      if (text[i] === ',') { i++; continue; }
      if (text[i] === '}') { i++; return obj; }
      fail("expected ',' or '}'");
    }
  }
  function array(depth) {
    i++;
    const arr = [];
    ws();
    if (text[i] === ']') { i++; return arr; }
    for (;;) {
      arr.push(value(depth + 1));
      ws();
      if (text[i] === ',') { i++; continue; }
      if (text[i] === ']') { i++; return arr; }
      fail("expected ',' or ']'");
    }
  }
  function string() {
    i++;
    let out = '';
    for (;;) {
      if (i >= text.length) fail('unterminated string');
      const c = text.charCodeAt(i);
      if (c === 0x22) { i++; break; }
      if (c < 0x20) fail('control character in string');
      if (c !== 0x5c) { out += text[i]; i++; continue; }
      const e = text[i + 1];
      const simple = { '"': '"', '\\': '\\', '/': '/', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t' };
      if (e in simple) { out += simple[e]; i += 2; continue; }
      if (e !== 'u') fail('bad escape');
      const h = text.slice(i + 2, i + 6);
      if (!/^[0-9a-fA-F]{4}$/.test(h)) fail('bad \\u escape');
      out += String.fromCharCode(parseInt(h, 16));
      i += 6;
    }
    // A string must be valid Unicode (it has to survive a MessagePack/UTF-8 round trip).
    if (!out.isWellFormed()) fail('lone surrogate in string');
    return out;
  }
  const v = value(0);
  ws();
  if (i !== text.length) fail('trailing data');
  return v;
}

// ---------------------------------------------------------------------------
// Strict MessagePack decoder: one value, no trailing bytes, string keys only, no duplicate
// keys, valid UTF-8 str, no NaN/Infinity, no extension types (ext/timestamp have no place
// in this protocol), floats -> WireFloat, bin -> Buffer.
// (@msgpack/msgpack's decoder cannot refuse duplicate keys nor tell 1.0 from 1, so the
// library is used for encoding and only as a lenient fallback to find a reply's mid.)
// ---------------------------------------------------------------------------
export function decodeStrictMsgpack(input) {
  const b = Buffer.isBuffer(input) ? input : Buffer.from(input.buffer, input.byteOffset, input.byteLength);
  let i = 0;
  const fail = (m) => { throw new StrictDecodeError(`msgpack: ${m} at offset ${i}`); };
  const need = (n) => { if (n < 0 || i + n > b.length) fail('truncated'); };
  const isStrHead = (t) => (t >= 0xa0 && t <= 0xbf) || t === 0xd9 || t === 0xda || t === 0xdb;
  function str(n) {
    need(n);
    let s;
    try { s = utf8Fatal.decode(b.subarray(i, i + n)); } catch { fail('invalid UTF-8 in str'); }
    i += n;
    return s;
  }
  function bin(n) { need(n); const out = Buffer.from(b.subarray(i, i + n)); i += n; return out; }
  function flt(f) { if (!Number.isFinite(f)) fail('NaN/Infinity'); return new WireFloat(f); }
  function big(x) { return (x >= BigInt(Number.MIN_SAFE_INTEGER) && x <= BigInt(Number.MAX_SAFE_INTEGER)) ? Number(x) : x; }
  function array(n, depth) {
    if (n > b.length - i) fail('array length exceeds input');
    const arr = [];
    for (let k = 0; k < n; k++) arr.push(value(depth + 1));
    return arr;
  }
  function map(n, depth) {
    if (n > b.length - i) fail('map length exceeds input');
    const obj = {};
    const seen = new Set();
    for (let k = 0; k < n; k++) {
      need(1);
      if (!isStrHead(b[i])) fail('non-string map key');
      const key = value(depth + 1);
      if (seen.has(key)) fail(`duplicate key ${JSON.stringify(key)}`);
      seen.add(key);
      defineOwn(obj, key, value(depth + 1));
    }
    return obj;
  }
  function value(depth) {
    if (depth > 128) fail('nesting too deep');
    need(1);
    const t = b[i++];
    if (t <= 0x7f) return t;
    if (t >= 0xe0) return t - 0x100;
    if (t >= 0x80 && t <= 0x8f) return map(t & 0x0f, depth);
    if (t >= 0x90 && t <= 0x9f) return array(t & 0x0f, depth);
    if (t >= 0xa0 && t <= 0xbf) return str(t & 0x1f);
    let v;
    switch (t) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: need(1); v = b.readUInt8(i); i += 1; return bin(v);
      case 0xc5: need(2); v = b.readUInt16BE(i); i += 2; return bin(v);
      case 0xc6: need(4); v = b.readUInt32BE(i); i += 4; return bin(v);
      case 0xca: need(4); v = b.readFloatBE(i); i += 4; return flt(v);
      case 0xcb: need(8); v = b.readDoubleBE(i); i += 8; return flt(v);
      case 0xcc: need(1); v = b.readUInt8(i); i += 1; return v;
      case 0xcd: need(2); v = b.readUInt16BE(i); i += 2; return v;
      case 0xce: need(4); v = b.readUInt32BE(i); i += 4; return v;
      case 0xcf: need(8); v = b.readBigUInt64BE(i); i += 8; return big(v);
      case 0xd0: need(1); v = b.readInt8(i); i += 1; return v;
      case 0xd1: need(2); v = b.readInt16BE(i); i += 2; return v;
      case 0xd2: need(4); v = b.readInt32BE(i); i += 4; return v;
      case 0xd3: need(8); v = b.readBigInt64BE(i); i += 8; return big(v);
      case 0xd9: need(1); v = b.readUInt8(i); i += 1; return str(v);
      case 0xda: need(2); v = b.readUInt16BE(i); i += 2; return str(v);
      case 0xdb: need(4); v = b.readUInt32BE(i); i += 4; return str(v);
      case 0xdc: need(2); v = b.readUInt16BE(i); i += 2; return array(v, depth);
      case 0xdd: need(4); v = b.readUInt32BE(i); i += 4; return array(v, depth);
      case 0xde: need(2); v = b.readUInt16BE(i); i += 2; return map(v, depth);
      case 0xdf: need(4); v = b.readUInt32BE(i); i += 4; return map(v, depth);
      case 0xc1: i--; fail('reserved type byte 0xc1');
      default: i--; fail(`extension type 0x${t.toString(16)} not accepted`);
    }
  }
  const v = value(0);
  if (i !== b.length) fail(`${b.length - i} trailing byte(s)`);
  return v;
}

// ---------------------------------------------------------------------------
// Binary <-> wire helpers
// ---------------------------------------------------------------------------
export function decodeCanonicalBase64(s) {
  if (typeof s !== 'string') throw new ProtocolError('expected a base64 string');
  if (s.length % 4 !== 0 || !/^[A-Za-z0-9+/]*(={0,2})$/.test(s)) throw new ProtocolError('base64 not canonical (alphabet/padding)');
  const buf = Buffer.from(s, 'base64');
  if (buf.toString('base64') !== s) throw new ProtocolError('base64 not canonical (stray bits or padding)');
  return buf;
}

function isPlainMap(x) {
  return x !== null && typeof x === 'object' && !Array.isArray(x) && !Buffer.isBuffer(x) && !(x instanceof WireFloat);
}

// Convert Buffers to base64 (for JSON); used on outgoing envelopes and plaintexts.
function toJsonWire(x) {
  if (Buffer.isBuffer(x) || x instanceof Uint8Array) return Buffer.from(x).toString('base64');
  if (Array.isArray(x)) return x.map(toJsonWire);
  if (x !== null && typeof x === 'object') {
    const o = {};
    for (const [k, v] of Object.entries(x)) defineOwn(o, k, toJsonWire(v));
    return o;
  }
  if (typeof x === 'number' && !Number.isFinite(x)) throw new ProtocolError('refusing to encode NaN/Infinity');
  return x;
}

function u8ToBuffer(u8) { return Buffer.from(u8.buffer, u8.byteOffset, u8.byteLength); }

// One codec per stream-entry field. The plaintext uses the same encoding as the envelope.
export const CODECS = {
  j: {
    field: 'j',
    name: 'json',
    encode: (obj) => Buffer.from(JSON.stringify(toJsonWire(obj)), 'utf8'),
    decode: decodeStrictJson,
    decodeLenient: (buf) => JSON.parse(buf.toString('utf8')),
    bytes: (v, what) => {
      if (typeof v !== 'string') throw new ProtocolError(`${what}: expected base64 string`);
      try { return decodeCanonicalBase64(v); } catch (e) { throw new ProtocolError(`${what}: ${e.message}`); }
    },
  },
  e: {
    field: 'e',
    name: 'msgpack',
    encode: (obj) => u8ToBuffer(msgpackEncode(obj)),
    decode: decodeStrictMsgpack,
    decodeLenient: (buf) => msgpackDecodeLenient(buf),
    bytes: (v, what) => {
      if (!Buffer.isBuffer(v)) throw new ProtocolError(`${what}: expected bin`);
      return v;
    },
  },
};

// ---------------------------------------------------------------------------
// Crypto helpers
// ---------------------------------------------------------------------------
export function hkdf32(ikm, info) {
  return Buffer.from(crypto.hkdfSync('sha256', ikm, Buffer.alloc(0), Buffer.from(info, 'ascii'), 32));
}
export const requestAad = (alg, sid, mid, ts, type) => `${PROTO}|req|${alg}|${sid}|${mid}|${ts}|${type}`;
export const replyAad = (alg, sid, mid, status) => `${PROTO}|rep|${alg}|${sid}|${mid}|${status}`;
export const skRequestKey = (ks, mid) => hkdf32(ks, `${PROTO} req ${mid}`);
export const skReplyKey = (ks, mid) => hkdf32(ks, `${PROTO} rep ${mid}`);
export const sessionInfo = (sid, ecRaw, ewRaw) => `${PROTO} session|${sid}|${ecRaw.toString('hex')}|${ewRaw.toString('hex')}`;

export function gcmSeal(key, iv, plaintext, aad) {
  const c = crypto.createCipheriv('aes-256-gcm', key, iv, { authTagLength: 16 });
  c.setAAD(Buffer.from(aad, 'ascii'));
  const ct = Buffer.concat([c.update(plaintext), c.final()]);
  return { ct, tag: c.getAuthTag() };
}
export function gcmOpen(key, iv, ct, tag, aad) {
  const d = crypto.createDecipheriv('aes-256-gcm', key, iv, { authTagLength: 16 });
  d.setAAD(Buffer.from(aad, 'ascii'));
  d.setAuthTag(tag);
  try {
    return Buffer.concat([d.update(ct), d.final()]);
  } catch {
    throw new ProtocolError('reply authentication failed (GCM tag)');
  }
}
export function rsaOaepWrap(publicKey, k) {
  return crypto.publicEncrypt({ key: publicKey, padding: crypto.constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, k);
}
export function kidOf(publicKey) {
  return crypto.createHash('sha256').update(publicKey.export({ type: 'spki', format: 'der' })).digest('hex');
}
export function x25519RawPublic(keyObject) {
  const der = keyObject.export({ type: 'spki', format: 'der' });
  if (der.length !== 44 || !der.subarray(0, 12).equals(X25519_SPKI_PREFIX)) throw new ProtocolError('unexpected X25519 SPKI');
  return der.subarray(der.length - 32);
}
export function x25519PublicFromRaw(raw) {
  return crypto.createPublicKey({ key: Buffer.concat([X25519_SPKI_PREFIX, raw]), format: 'der', type: 'spki' });
}
export function deriveKs(kb, ecPrivate, ecRaw, ewRaw, sid) {
  let shared;
  try {
    shared = crypto.diffieHellman({ privateKey: ecPrivate, publicKey: x25519PublicFromRaw(ewRaw) });
  } catch {
    throw new ProtocolError('X25519 with serverEphemeral failed');
  }
  if (shared.length !== 32 || shared.every((x) => x === 0)) throw new ProtocolError('serverEphemeral is low-order (all-zero shared secret)');
  return hkdf32(Buffer.concat([kb, shared]), sessionInfo(sid, ecRaw, ewRaw));
}
const randHex = (n) => crypto.randomBytes(n).toString('hex');

function isInt(x) { return typeof x === 'number' && Number.isSafeInteger(x); }

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------
// Build (and seal) one request. Returns the envelope object (Buffers for binary fields),
// the reply key, and bookkeeping.
export function buildRequest({ alg, sid, type, plaintext, codec, rsaPublicKey, k, ks, kid, mid, ts }) {
  if (!HEX32.test(sid)) throw new ProtocolError('bad sid');
  if (!TYPE_RE.test(type)) throw new ProtocolError('bad type');
  mid = mid ?? randHex(16);
  ts = ts ?? Date.now();
  const iv = crypto.randomBytes(12);
  const env = { v: 1, alg, sid, mid, ts, type };
  let reqKey; let repKey;
  if (alg === ALG_RSA) {
    k = k ?? crypto.randomBytes(32);
    reqKey = k; repKey = k;
    env.encryptedAesKey = rsaOaepWrap(rsaPublicKey, k);
  } else if (alg === ALG_SK) {
    reqKey = skRequestKey(ks, mid);
    repKey = skReplyKey(ks, mid);
  } else {
    throw new ProtocolError(`unknown alg ${alg}`);
  }
  if (kid !== undefined) env.kid = kid;
  const { ct, tag } = gcmSeal(reqKey, iv, codec.encode(plaintext), requestAad(alg, sid, mid, ts, type));
  env.iv = iv;
  env.encryptedData = ct;
  env.authTag = tag;
  return { env, mid, ts, repKey, alg, sid, codec };
}

// Verify a reply envelope strictly and open it. `raw` is the entry's field value (Buffer).
export function openReply(req, raw) {
  const { codec, alg, sid, mid, repKey } = req;
  const env = codec.decode(raw);
  if (!isPlainMap(env)) throw new ProtocolError('reply envelope is not a map');
  const keys = Object.keys(env);
  if (!isInt(env.v) || env.v !== 1) throw new ProtocolError(`reply v must be integer 1, got ${JSON.stringify(env.v)}`);
  if (env.sid !== sid) throw new ProtocolError('reply sid mismatch');
  if (env.mid !== mid) throw new ProtocolError('reply mid mismatch');
  if (typeof env.status !== 'string' || !STATUSES.has(env.status)) throw new ProtocolError(`reply status invalid: ${JSON.stringify(env.status)}`);
  const status = env.status;
  if (status === 'rejected') {
    // Unauthenticated notice. Our alg is always a recognised one, so alg must be present.
    const allowed = new Set(['v', 'alg', 'sid', 'mid', 'status', 'code']);
    const extra = keys.filter((k) => !allowed.has(k));
    if (extra.length) throw new ProtocolError(`rejected notice has unexpected field(s) ${extra.join(',')}`);
    const missing = [...allowed].filter((k) => !(k in env));
    if (missing.length) throw new ProtocolError(`rejected notice lacks field(s) ${missing.join(',')}`);
    if (env.alg !== alg) throw new ProtocolError(`rejected notice alg mismatch: ${JSON.stringify(env.alg)}`);
    if (typeof env.code !== 'string' || !NOTICE_CODES.has(env.code)) throw new ProtocolError(`rejected notice code invalid: ${JSON.stringify(env.code)}`);
    return { status, code: env.code, authenticated: false };
  }
  const required = ['v', 'alg', 'sid', 'mid', 'status', 'iv', 'encryptedData', 'authTag'];
  const extra = keys.filter((k) => !required.includes(k));
  if (extra.length) throw new ProtocolError(`reply has unexpected field(s) ${extra.join(',')}`);
  const missing = required.filter((k) => !(k in env));
  if (missing.length) throw new ProtocolError(`reply lacks field(s) ${missing.join(',')}`);
  if (env.alg !== alg) throw new ProtocolError(`reply alg mismatch: ${JSON.stringify(env.alg)}`);
  const iv = codec.bytes(env.iv, 'iv');
  const ct = codec.bytes(env.encryptedData, 'encryptedData');
  const tag = codec.bytes(env.authTag, 'authTag');
  if (iv.length !== 12) throw new ProtocolError(`reply iv is ${iv.length} bytes, want 12`);
  if (tag.length !== 16) throw new ProtocolError(`reply authTag is ${tag.length} bytes, want 16`);
  const pt = gcmOpen(repKey, iv, ct, tag, replyAad(alg, sid, mid, status));
  const value = codec.decode(pt);
  if (status === 'error') {
    if (!isPlainMap(value)) throw new ProtocolError('error plaintext is not a map');
    const k = Object.keys(value).sort();
    if (k.length !== 2 || k[0] !== 'code' || k[1] !== 'message') throw new ProtocolError(`error plaintext fields ${JSON.stringify(k)}, want {code,message}`);
    if (typeof value.code !== 'string' || !ERROR_CODES.has(value.code)) throw new ProtocolError(`error code invalid: ${JSON.stringify(value.code)}`);
    if (typeof value.message !== 'string') throw new ProtocolError('error message is not a string');
    return { status, code: value.code, message: value.message, authenticated: true };
  }
  return { status, result: value, authenticated: true };
}

// ---------------------------------------------------------------------------
// Redis transport
// ---------------------------------------------------------------------------
export class Transport {
  constructor(redis, prefix, shards, timeoutMs) {
    this.redis = redis;
    this.prefix = prefix;
    this.shards = shards;
    this.timeoutMs = timeoutMs;
    this.cursors = new Map(); // reply stream key -> last id read
    this.pending = new Map(); // reply stream key -> [{id, field, raw, mid}]
  }
  shardKey(mid) { return `${this.prefix}:req:{${parseInt(mid.slice(0, 8), 16) % this.shards}}`; }
  replyKey(sid) { return `${this.prefix}:{${sid}}:reply`; }

  async send(req, envOverride) {
    const env = envOverride ?? req.env;
    const key = this.shardKey(req.mid);
    const value = req.codec.encode(env);
    const id = await this.redis.sendCommand(['XADD', key, '*', req.codec.field, value]);
    return { stream: key, id: String(id) };
  }

  // Peek at an entry to learn its mid (strictly if possible, else leniently).
  static entryMid(field, raw) {
    const codec = CODECS[field];
    if (!codec) return null;
    for (const dec of [codec.decode, codec.decodeLenient]) {
      try {
        const v = dec(raw);
        if (isPlainMap(v) && typeof v.mid === 'string') return v.mid;
      } catch { /* try next */ }
    }
    return null;
  }

  // Wait for the next reply entry for `mid` on the session's reply stream.
  async awaitEntry(sid, mid) {
    const key = this.replyKey(sid);
    if (!this.cursors.has(key)) { this.cursors.set(key, '0'); this.pending.set(key, []); }
    const pend = this.pending.get(key);
    const deadline = Date.now() + this.timeoutMs;
    for (;;) {
      const idx = pend.findIndex((e) => e.mid === mid);
      if (idx >= 0) return pend.splice(idx, 1)[0];
      const remaining = deadline - Date.now();
      if (remaining <= 0) throw new ProtocolError(`timeout after ${this.timeoutMs} ms waiting for reply to mid ${mid} on ${key}`);
      const res = await this.redis.sendCommand(
        ['XREAD', 'COUNT', '100', 'BLOCK', String(Math.max(1, remaining)), 'STREAMS', key, this.cursors.get(key)],
        { returnBuffers: true },
      );
      if (!res) continue;
      for (const [, entries] of res) {
        for (const [idBuf, fields] of entries) {
          const id = idBuf.toString();
          this.cursors.set(key, id);
          const names = [];
          for (let f = 0; f < fields.length; f += 2) names.push(fields[f].toString());
          const entry = { id, names, field: names.length === 1 ? names[0] : null, raw: fields.length === 2 ? fields[1] : null, mid: null };
          if (entry.field) entry.mid = Transport.entryMid(entry.field, entry.raw);
          else {
            // malformed reply entry: still try to attribute it so the step fails loudly
            for (let f = 0; f + 1 < fields.length; f += 2) {
              const m = Transport.entryMid(fields[f].toString(), fields[f + 1]);
              if (m) { entry.mid = m; break; }
            }
          }
          pend.push(entry);
        }
      }
    }
  }

  // Wait for and open the reply of a request.
  async awaitReply(req) {
    const entry = await this.awaitEntry(req.sid, req.mid);
    if (entry.names.length !== 1) throw new ProtocolError(`reply entry ${entry.id} has fields ${JSON.stringify(entry.names)}, want exactly one`);
    if (entry.field !== req.codec.field) throw new ProtocolError(`reply entry uses field ${JSON.stringify(entry.field)}, request used ${JSON.stringify(req.codec.field)}`);
    return { ...openReply(req, entry.raw), entryId: entry.id };
  }
}

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------
export async function handshake(transport, { servicePublicKey, kid, codec, ttl }) {
  const kb = crypto.randomBytes(32);
  const { publicKey: ecPub, privateKey: ecPriv } = crypto.generateKeyPairSync('x25519');
  const ecRaw = x25519RawPublic(ecPub);
  const sid = randHex(16);
  const plaintext = { clientEphemeral: ecRaw };
  if (ttl !== undefined) plaintext.ttl = ttl;
  const req = buildRequest({ alg: ALG_RSA, sid, type: HANDSHAKE_TYPE, plaintext, codec, rsaPublicKey: servicePublicKey, k: kb, kid });
  const sent = await transport.send(req);
  const rep = await transport.awaitReply(req);
  if (rep.status !== 'ok') {
    throw new ProtocolError(`handshake reply status ${rep.status} code ${rep.code}${rep.message ? ` (${rep.message})` : ''}`);
  }
  const r = rep.result;
  if (!isPlainMap(r)) throw new ProtocolError('handshake result is not a map');
  const want = ['expiresAt', 'publicKey', 'serverEphemeral', 'sessionId'];
  const got = Object.keys(r).sort();
  if (!isDeepStrictEqual(got, want)) throw new ProtocolError(`handshake result fields ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
  if (r.sessionId !== sid) throw new ProtocolError('handshake sessionId mismatch');
  if (!isInt(r.expiresAt)) throw new ProtocolError('handshake expiresAt is not an integer');
  if (r.expiresAt <= req.ts) throw new ProtocolError('handshake expiresAt is in the past');
  if (typeof r.publicKey !== 'string' || !r.publicKey.includes('-----BEGIN PUBLIC KEY-----')) throw new ProtocolError('handshake publicKey is not a PEM SPKI string');
  let sessionPublicKey;
  try { sessionPublicKey = crypto.createPublicKey({ key: r.publicKey, format: 'pem', type: 'spki' }); } catch { throw new ProtocolError('handshake publicKey does not parse'); }
  if (sessionPublicKey.asymmetricKeyType !== 'rsa') throw new ProtocolError(`session key type ${sessionPublicKey.asymmetricKeyType}, want rsa`);
  const bits = sessionPublicKey.asymmetricKeyDetails.modulusLength;
  if (bits < 2048) throw new ProtocolError(`session key has ${bits} bits, < 2048`);
  const ewRaw = codec.bytes(r.serverEphemeral, 'serverEphemeral');
  if (ewRaw.length !== 32) throw new ProtocolError(`serverEphemeral is ${ewRaw.length} bytes, want 32`);
  const ks = deriveKs(kb, ecPriv, ecRaw, ewRaw, sid);
  return {
    sid, ks, sessionPublicKey, bits, expiresAt: r.expiresAt,
    info: { mid: req.mid, entryId: sent.id, replyEntryId: rep.entryId, stream: sent.stream, sessionKeyBits: bits, ttlMs: r.expiresAt - req.ts },
  };
}

// ---------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------
const ECHO_PAYLOAD = { hello: 'node', n: 42, nested: { list: [1, 2, 3] } };

function out(obj) { process.stdout.write(`${JSON.stringify(obj)}\n`); }

const results = [];

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

  let servicePublicKey;
  try {
    servicePublicKey = crypto.createPublicKey({ key: fs.readFileSync(pemFile, 'utf8'), format: 'pem', type: 'spki' });
  } catch (e) {
    refuse(`cannot load service public key: ${e.message}`);
  }
  if (servicePublicKey.asymmetricKeyType !== 'rsa') refuse(`service key type ${servicePublicKey.asymmetricKeyType}, want rsa`);
  const fileKid = kidOf(servicePublicKey);
  if (fileKid !== pin) refuse('service public key does not match the pinned kid', { fileKid, pinnedKid: pin });

  const redis = createClient({ url, socket: { connectTimeout: 5000, reconnectStrategy: false } });
  redis.on('error', () => { /* surfaced through the failing command */ });
  try {
    await redis.connect();
  } catch (e) {
    out({ step: 'connect', ok: false, error: `cannot connect to redis: ${e.message}` });
    out({ done: true, passed: 0, failed: 1 });
    process.exit(1);
  }

  const config = await redis.hGetAll(`${prefix}:config`);
  if (config.kid !== pin) refuse(`${prefix}:config kid does not equal the pinned kid`, { configKid: config.kid ?? null, pinnedKid: pin });
  let shards = 1;
  if (config.shards !== undefined) {
    if (!/^[1-9][0-9]{0,5}$/.test(config.shards)) refuse(`${prefix}:config shards is not a positive integer: ${JSON.stringify(config.shards)}`);
    shards = Number(config.shards);
  }
  let configKeyMatches = null;
  if (config.servicePublicKey !== undefined) {
    try { configKeyMatches = kidOf(crypto.createPublicKey(config.servicePublicKey)) === pin; } catch { configKeyMatches = false; }
  }
  record({ step: 'config', ok: true, kid: pin, shards, configServicePublicKeyMatchesPin: configKeyMatches });

  const transport = new Transport(redis, prefix, shards, timeoutMs);
  const codecJ = CODECS.j;
  const codecE = CODECS.e;

  // a. handshake (JSON entries)
  let session = null;
  try {
    session = await handshake(transport, { servicePublicKey, kid: pin, codec: codecJ, ttl: 600 });
    record({ step: 'handshake', encoding: 'j', alg: ALG_RSA, ok: true, sid: session.sid, ...session.info });
  } catch (e) {
    record({ step: 'handshake', encoding: 'j', alg: ALG_RSA, ok: false, error: e.message });
  }

  const needSession = (step, extra) => {
    if (!session) { record({ step, ...extra, ok: false, error: 'no session (handshake failed)' }); return false; }
    return true;
  };
  const reqOpts = (alg, codec) => ({ alg, sid: session.sid, codec, rsaPublicKey: session.sessionPublicKey, ks: session.ks });

  // b/c/d. echo, both algs, both encodings
  const acceptedSk = {}; // encoding -> a request whose reply was ok (for the replay check)
  for (const codec of [codecJ, codecE]) {
    for (const alg of [ALG_RSA, ALG_SK]) {
      const step = 'echo';
      const base = { step, encoding: codec.field, alg };
      if (!needSession(step, base)) continue;
      try {
        const req = buildRequest({ ...reqOpts(alg, codec), type: 'echo', plaintext: ECHO_PAYLOAD });
        await transport.send(req);
        const rep = await transport.awaitReply(req);
        if (rep.status !== 'ok') throw new ProtocolError(`status ${rep.status} code ${rep.code}`);
        if (!isDeepStrictEqual(rep.result, ECHO_PAYLOAD)) throw new ProtocolError(`echo result differs: ${JSON.stringify(rep.result)}`);
        if (alg === ALG_SK) acceptedSk[codec.field] = req;
        record({ ...base, ok: true, mid: req.mid, status: rep.status });
      } catch (e) {
        record({ ...base, ok: false, error: e.message });
      }
    }
  }

  // e. unknown handler -> error / unknown_type (SK mode)
  for (const codec of [codecJ, codecE]) {
    const base = { step: 'unknown_type', encoding: codec.field, alg: ALG_SK };
    if (!needSession(base.step, base)) continue;
    try {
      const req = buildRequest({ ...reqOpts(ALG_SK, codec), type: 'nope', plaintext: { x: 1 } });
      await transport.send(req);
      const rep = await transport.awaitReply(req);
      if (rep.status !== 'error' || rep.code !== 'unknown_type') throw new ProtocolError(`got status ${rep.status} code ${rep.code}, want error/unknown_type`);
      record({ ...base, ok: true, mid: req.mid, status: rep.status, code: rep.code, message: rep.message });
    } catch (e) {
      record({ ...base, ok: false, error: e.message });
    }
  }

  // f. tamper: one bit of authTag flipped -> rejected/rejected; then the untampered envelope
  //    with the same mid must still be accepted (a forgery cannot burn a mid).
  for (const codec of [codecJ, codecE]) {
    const base = { step: 'tamper', encoding: codec.field, alg: ALG_SK };
    if (!needSession(base.step, base)) continue;
    try {
      const req = buildRequest({ ...reqOpts(ALG_SK, codec), type: 'echo', plaintext: ECHO_PAYLOAD });
      const badTag = Buffer.from(req.env.authTag);
      badTag[0] ^= 0x01;
      await transport.send(req, { ...req.env, authTag: badTag });
      const rep = await transport.awaitReply(req);
      if (rep.status !== 'rejected' || rep.code !== 'rejected') throw new ProtocolError(`tampered request got status ${rep.status} code ${rep.code}, want rejected/rejected`);
      await transport.send(req);
      const rep2 = await transport.awaitReply(req);
      if (rep2.status !== 'ok' || !isDeepStrictEqual(rep2.result, ECHO_PAYLOAD)) throw new ProtocolError(`untampered resend after rejection got status ${rep2.status} code ${rep2.code}, want ok echo (mid must not be burnt by a forgery)`);
      record({ ...base, ok: true, mid: req.mid, status: rep.status, code: rep.code, resendStatus: rep2.status });
    } catch (e) {
      record({ ...base, ok: false, error: e.message });
    }
  }

  // extra: replay of an accepted envelope (new stream entry, same mid) -> rejected/replay
  {
    const base = { step: 'replay', encoding: 'j', alg: ALG_SK };
    if (needSession(base.step, base)) {
      try {
        const req = acceptedSk.j;
        if (!req) throw new ProtocolError('no accepted SK/j request to replay');
        await transport.send(req);
        const rep = await transport.awaitReply(req);
        if (rep.status !== 'rejected' || rep.code !== 'replay') throw new ProtocolError(`replayed request got status ${rep.status} code ${rep.code}, want rejected/replay`);
        record({ ...base, ok: true, mid: req.mid, status: rep.status, code: rep.code });
      } catch (e) {
        record({ ...base, ok: false, error: e.message });
      }
    }
  }

  await redis.quit().catch(() => {});
  const passed = results.filter(Boolean).length;
  const failed = results.length - passed;
  out({ done: true, passed, failed });
  process.exit(failed === 0 ? 0 : 1);
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((e) => {
    out({ step: 'fatal', ok: false, error: e.message });
    const passed = results.filter(Boolean).length;
    out({ done: true, passed, failed: results.length - passed + 1 });
    process.exit(1);
  });
}
