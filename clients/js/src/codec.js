// Strict codecs of the wire protocol, for Node and browsers alike (no Buffer).
//
// Decoding is strict everywhere, as PROTOCOL.md asks: one value and no trailing
// bytes, string keys only, no duplicate keys, no NaN/Infinity, no MessagePack
// extension types, valid UTF-8. Binary is a Uint8Array; in JSON it travels as
// canonical padded standard base64. Integers beyond 2^53 decode to BigInt.
// With `{ floats: 'wrap' }` a number sent as a float decodes to a WireFloat, so
// envelope fields can refuse `1.0` where an integer is due; otherwise it is a
// plain number (JavaScript has no other).

import { ProtocolError } from './errors.js';

export class DecodeError extends ProtocolError {}

/** A number that was a float on the wire (JSON fraction/exponent, MessagePack float). */
export class WireFloat {
  constructor(value) { this.value = value; }
}

const MAX_DEPTH = 64;
const utf8 = new TextEncoder();
const utf8Fatal = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

function defineOwn(obj, key, value) {
  // defineProperty, so that a key "__proto__" is an ordinary own property
  Object.defineProperty(obj, key, { value, enumerable: true, writable: true, configurable: true });
}

export function isPlainMap(x) {
  return x !== null && typeof x === 'object' && !Array.isArray(x)
    && !(x instanceof Uint8Array) && !(x instanceof WireFloat);
}

// -- base64 ---------------------------------------------------------------------------

const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';
const B64_INDEX = new Map([...B64].map((c, i) => [c, i]));

/** Canonical standard base64 with padding. */
export function b64encode(bytes) {
  let out = '';
  for (let i = 0; i < bytes.length; i += 3) {
    const n = (bytes[i] << 16) | ((bytes[i + 1] ?? 0) << 8) | (bytes[i + 2] ?? 0);
    out += B64[(n >> 18) & 63] + B64[(n >> 12) & 63];
    out += i + 1 < bytes.length ? B64[(n >> 6) & 63] : '=';
    out += i + 2 < bytes.length ? B64[n & 63] : '=';
  }
  return out;
}

/** Decode canonical base64 only: padding, no whitespace, no stray bits. */
export function b64decode(text) {
  if (typeof text !== 'string' || text.length % 4 !== 0) throw new DecodeError('not canonical base64');
  const pad = text.endsWith('==') ? 2 : text.endsWith('=') ? 1 : 0;
  const out = new Uint8Array((text.length / 4) * 3 - pad);
  let o = 0;
  for (let i = 0; i < text.length; i += 4) {
    let n = 0;
    for (let j = 0; j < 4; j++) {
      const c = text[i + j];
      const last = i + 4 === text.length;
      let v;
      if (c === '=' && last && j >= 4 - pad) v = 0;
      else {
        v = B64_INDEX.get(c);
        if (v === undefined) throw new DecodeError('not canonical base64');
      }
      n = (n << 6) | v;
    }
    const b = [(n >> 16) & 255, (n >> 8) & 255, n & 255];
    const take = i + 4 === text.length ? 3 - pad : 3;
    // Stray bits: the bits under the padding must be zero.
    for (let k = take; k < 3; k++) if (b[k] !== 0) throw new DecodeError('not canonical base64');
    for (let k = 0; k < take; k++) out[o++] = b[k];
  }
  return out;
}

// -- strict JSON -----------------------------------------------------------------------

/** Decode one strict JSON value (RFC 8259) from UTF-8 bytes. */
export function decodeJson(bytes, { floats = 'number' } = {}) {
  let text;
  try { text = utf8Fatal.decode(bytes); } catch { throw new DecodeError('json: invalid UTF-8'); }
  let i = 0;
  const fail = (m) => { throw new DecodeError(`json: ${m} at offset ${i}`); };
  const ws = () => {
    while (i < text.length) {
      const c = text.charCodeAt(i);
      if (c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d) i++; else break;
    }
  };
  const NUM = /-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/y;
  const SIMPLE = { '"': '"', '\\': '\\', '/': '/', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t' };
  function value(depth) {
    if (depth > MAX_DEPTH) fail('nested too deeply');
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
        return floats === 'wrap' ? new WireFloat(f) : f;
      }
      const n = Number(m[0]);
      return Number.isSafeInteger(n) ? n : BigInt(m[0]);
    }
    for (const [lit, v] of [['true', true], ['false', false], ['null', null]]) {
      if (text.startsWith(lit, i)) { i += lit.length; return v; }
    }
    return fail('unexpected token');
  }
  function object(depth) {
    i++;
    const obj = {};
    const seen = new Set();
    ws();
    if (text[i] === '}') { i++; return obj; }
    for (;;) {
      ws();
      if (text[i] !== '"') fail('expected a string key');
      const k = string();
      if (seen.has(k)) fail('duplicate key');
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
      if (e in SIMPLE) { out += SIMPLE[e]; i += 2; continue; }
      if (e !== 'u') fail('bad escape');
      const h = text.slice(i + 2, i + 6);
      if (!/^[0-9a-fA-F]{4}$/.test(h)) fail('bad \\u escape');
      out += String.fromCharCode(parseInt(h, 16));
      i += 6;
    }
    if (!isWellFormed(out)) fail('lone surrogate in string');
    return out;
  }
  const v = value(0);
  ws();
  if (i !== text.length) fail('trailing data');
  return v;
}

function isWellFormed(s) {
  if (typeof s.isWellFormed === 'function') return s.isWellFormed();
  return !/[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/.test(s);
}

// -- strict MessagePack ----------------------------------------------------------------

/** Decode one strict MessagePack value. */
export function decodeMsgpack(input, { floats = 'number' } = {}) {
  const b = input instanceof Uint8Array ? input : new Uint8Array(input);
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  let i = 0;
  const fail = (m) => { throw new DecodeError(`msgpack: ${m} at offset ${i}`); };
  const need = (n) => { if (i + n > b.length) fail('truncated'); };
  const isStrHead = (t) => (t >= 0xa0 && t <= 0xbf) || t === 0xd9 || t === 0xda || t === 0xdb;
  function str(n) {
    need(n);
    let s;
    try { s = utf8Fatal.decode(b.subarray(i, i + n)); } catch { fail('invalid UTF-8 in str'); }
    i += n;
    return s;
  }
  // A copy, and a plain Uint8Array even when given a Buffer (whose slice is a view).
  function bin(n) { need(n); const out = Uint8Array.prototype.slice.call(b, i, i + n); i += n; return out; }
  function flt(f) {
    if (!Number.isFinite(f)) fail('NaN/Infinity');
    return floats === 'wrap' ? new WireFloat(f) : f;
  }
  const big = (x) => (x >= BigInt(Number.MIN_SAFE_INTEGER) && x <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(x) : x);
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
      if (seen.has(key)) fail('duplicate key');
      seen.add(key);
      defineOwn(obj, key, value(depth + 1));
    }
    return obj;
  }
  function read(n, get) { need(n); const v = get(i); i += n; return v; }
  function value(depth) {
    if (depth > MAX_DEPTH) fail('nested too deeply');
    need(1);
    const t = b[i++];
    if (t <= 0x7f) return t;
    if (t >= 0xe0) return t - 0x100;
    if (t >= 0x80 && t <= 0x8f) return map(t & 0x0f, depth);
    if (t >= 0x90 && t <= 0x9f) return array(t & 0x0f, depth);
    if (t >= 0xa0 && t <= 0xbf) return str(t & 0x1f);
    switch (t) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: return bin(read(1, (p) => dv.getUint8(p)));
      case 0xc5: return bin(read(2, (p) => dv.getUint16(p)));
      case 0xc6: return bin(read(4, (p) => dv.getUint32(p)));
      case 0xca: return flt(read(4, (p) => dv.getFloat32(p)));
      case 0xcb: return flt(read(8, (p) => dv.getFloat64(p)));
      case 0xcc: return read(1, (p) => dv.getUint8(p));
      case 0xcd: return read(2, (p) => dv.getUint16(p));
      case 0xce: return read(4, (p) => dv.getUint32(p));
      case 0xcf: return big(read(8, (p) => dv.getBigUint64(p)));
      case 0xd0: return read(1, (p) => dv.getInt8(p));
      case 0xd1: return read(2, (p) => dv.getInt16(p));
      case 0xd2: return read(4, (p) => dv.getInt32(p));
      case 0xd3: return big(read(8, (p) => dv.getBigInt64(p)));
      case 0xd9: return str(read(1, (p) => dv.getUint8(p)));
      case 0xda: return str(read(2, (p) => dv.getUint16(p)));
      case 0xdb: return str(read(4, (p) => dv.getUint32(p)));
      case 0xdc: return array(read(2, (p) => dv.getUint16(p)), depth);
      case 0xdd: return array(read(4, (p) => dv.getUint32(p)), depth);
      case 0xde: return map(read(2, (p) => dv.getUint16(p)), depth);
      case 0xdf: return map(read(4, (p) => dv.getUint32(p)), depth);
      default: i--; return fail(`type byte 0x${t.toString(16)} not accepted`);
    }
  }
  const v = value(0);
  if (i !== b.length) fail('trailing bytes');
  return v;
}

// -- encoders --------------------------------------------------------------------------

function isPlainObject(v) {
  const proto = Object.getPrototypeOf(v);
  return proto === Object.prototype || proto === null;
}

function checkKey(k) {
  if (!isWellFormed(k)) throw new TypeError('map keys must be valid Unicode');
}

/** Encode a value as MessagePack (binary as bin, integers in the smallest form). */
export function encodeMsgpack(value) {
  const parts = [];
  let size = 0;
  const push = (u8) => { parts.push(u8); size += u8.length; };
  const bytes = (...xs) => push(Uint8Array.from(xs));
  const withView = (n, head, set) => {
    const u = new Uint8Array(n + 1);
    u[0] = head;
    set(new DataView(u.buffer), 1);
    push(u);
  };
  function int(n) {
    if (n >= 0) {
      if (n <= 0x7f) bytes(n);
      else if (n <= 0xff) bytes(0xcc, n);
      else if (n <= 0xffff) withView(2, 0xcd, (d, o) => d.setUint16(o, n));
      else if (n <= 0xffffffff) withView(4, 0xce, (d, o) => d.setUint32(o, n));
      else withView(8, 0xcf, (d, o) => d.setBigUint64(o, BigInt(n)));
    } else if (n >= -32) bytes(n & 0xff);
    else if (n >= -0x80) withView(1, 0xd0, (d, o) => d.setInt8(o, n));
    else if (n >= -0x8000) withView(2, 0xd1, (d, o) => d.setInt16(o, n));
    else if (n >= -0x80000000) withView(4, 0xd2, (d, o) => d.setInt32(o, n));
    else withView(8, 0xd3, (d, o) => d.setBigInt64(o, BigInt(n)));
  }
  function head(n, fix, fixMax, h8, h16, h32) {
    if (fix !== null && n <= fixMax) bytes(fix | n);
    else if (h8 !== null && n <= 0xff) bytes(h8, n);
    else if (n <= 0xffff) withView(2, h16, (d, o) => d.setUint16(o, n));
    else withView(4, h32, (d, o) => d.setUint32(o, n));
  }
  function str(s) {
    const u = utf8.encode(s);
    head(u.length, 0xa0, 31, 0xd9, 0xda, 0xdb);
    push(u);
  }
  function enc(v, depth) {
    if (depth > MAX_DEPTH) throw new TypeError('nested too deeply');
    if (v === null || v === undefined) bytes(0xc0);
    else if (v === true) bytes(0xc3);
    else if (v === false) bytes(0xc2);
    else if (typeof v === 'number') {
      if (!Number.isFinite(v)) throw new TypeError('NaN and Infinity cannot be sent');
      if (Number.isSafeInteger(v)) int(v);
      else withView(8, 0xcb, (d, o) => d.setFloat64(o, v));
    } else if (typeof v === 'bigint') {
      if (v >= 0n && v <= 0xffffffffffffffffn) withView(8, 0xcf, (d, o) => d.setBigUint64(o, v));
      else if (v < 0n && v >= -(2n ** 63n)) withView(8, 0xd3, (d, o) => d.setBigInt64(o, v));
      else throw new TypeError('integer out of MessagePack range');
    } else if (typeof v === 'string') {
      if (!isWellFormed(v)) throw new TypeError('strings must be valid Unicode');
      str(v);
    } else if (v instanceof WireFloat) enc(v.value, depth);
    else if (v instanceof Uint8Array) { head(v.length, null, 0, 0xc4, 0xc5, 0xc6); push(v); }
    else if (Array.isArray(v)) { head(v.length, 0x90, 15, null, 0xdc, 0xdd); for (const x of v) enc(x, depth + 1); }
    else if (typeof v === 'object' && isPlainObject(v)) {
      const entries = Object.entries(v).filter(([, x]) => x !== undefined);
      head(entries.length, 0x80, 15, null, 0xde, 0xdf);
      for (const [k, x] of entries) { checkKey(k); str(k); enc(x, depth + 1); }
    } else throw new TypeError(`${v?.constructor?.name ?? typeof v} values cannot be sent`);
  }
  enc(value, 0);
  const out = new Uint8Array(size);
  let o = 0;
  for (const p of parts) { out.set(p, o); o += p.length; }
  return out;
}

function toJsonValue(v, depth) {
  if (depth > MAX_DEPTH) throw new TypeError('nested too deeply');
  if (v instanceof Uint8Array) return b64encode(v);
  if (v instanceof WireFloat) return v.value;
  if (typeof v === 'number' && !Number.isFinite(v)) throw new TypeError('NaN and Infinity cannot be sent');
  if (typeof v === 'bigint') throw new TypeError('BigInt cannot be sent as JSON');
  if (typeof v === 'string' && !isWellFormed(v)) throw new TypeError('strings must be valid Unicode');
  if (Array.isArray(v)) return v.map((x) => toJsonValue(x, depth + 1));
  if (v !== null && typeof v === 'object') {
    // Dates, Maps, class instances...: JSON.stringify would send them silently changed.
    if (!isPlainObject(v)) throw new TypeError(`${v.constructor?.name ?? 'object'} values cannot be sent`);
    const o = {};
    for (const [k, x] of Object.entries(v)) { checkKey(k); if (x !== undefined) defineOwn(o, k, toJsonValue(x, depth + 1)); }
    return o;
  }
  if (typeof v === 'function' || typeof v === 'symbol') throw new TypeError(`${typeof v} values cannot be sent`);
  return v;
}

/** Encode a value as compact UTF-8 JSON (JSON.stringify), binary as canonical base64. */
export function encodeJson(value) {
  return utf8.encode(JSON.stringify(toJsonValue(value, 0)));
}

/** The two encodings, by stream-entry field name. */
export const CODECS = Object.freeze({
  e: Object.freeze({
    field: 'e',
    encode: encodeMsgpack,
    decode: decodeMsgpack,
    // A binary value as MessagePack carries it.
    bytes(v, what) {
      if (!(v instanceof Uint8Array)) throw new DecodeError(`${what}: expected binary`);
      return v;
    },
    wireBytes: (u8) => u8,
  }),
  j: Object.freeze({
    field: 'j',
    encode: encodeJson,
    decode: decodeJson,
    bytes(v, what) {
      if (typeof v !== 'string') throw new DecodeError(`${what}: expected a base64 string`);
      try { return b64decode(v); } catch { throw new DecodeError(`${what}: not canonical base64`); }
    },
    wireBytes: (u8) => b64encode(u8),
  }),
});

/** Strip WireFloat wrappers (user-facing values use plain numbers). */
export function unwrapFloats(v) {
  if (v instanceof WireFloat) return v.value;
  if (Array.isArray(v)) return v.map(unwrapFloats);
  if (isPlainMap(v)) {
    const o = {};
    for (const [k, x] of Object.entries(v)) defineOwn(o, k, unwrapFloats(x));
    return o;
  }
  return v;
}
