// Sealing requests and opening replies: pure functions of values and keys (no I/O).

import { CODECS, DecodeError, WireFloat, isPlainMap, unwrapFloats } from './codec.js';
import {
  ALG_RSA, ALG_SK, IV_SIZE, OpenError, TAG_SIZE, gcmOpen, gcmSeal, newId, randomBytes,
  replyAad, requestAad, rsaWrap, skReplyKey, skRequestKey,
} from './crypto.js';

export const HEX32 = /^[0-9a-f]{32}$/;
export const HEX64 = /^[0-9a-f]{64}$/;
export const TYPE_RE = /^[A-Za-z0-9_.:-]{1,64}$/;
export const STATUSES = new Set(['ok', 'error', 'rejected']);
export const ERROR_CODES = new Set(['unknown_type', 'bad_payload', 'handler_error', 'timeout']);
export const NOTICE_CODES = new Set(['rejected', 'session_unknown', 'expired', 'replay', 'delivery_limit']);
export const MAX_ENTRY_SIZE = 1024 * 1024;

const isInt = (x) => typeof x === 'number' && Number.isSafeInteger(x);

/**
 * Seal one request. `rsa` (an imported public key) for RSA-OAEP-256+A256GCM, `ks`
 * (32 bytes) for SK+A256GCM; `key` forces the per-request AES key (the handshake's
 * bootstrap key Kb). Returns { env, mid, ts, alg, sid, type, codec, replyKey }.
 */
export async function sealRequest({ alg, sid, type, payload, codec, rsa, ks, key, kid, mid, ts }) {
  if (!HEX32.test(sid)) throw new TypeError('sid must be 32 lowercase hex characters');
  if (typeof type !== 'string' || !TYPE_RE.test(type)) throw new TypeError('type must match [A-Za-z0-9_.:-]{1,64}');
  mid = mid ?? newId();
  ts = ts ?? Date.now();
  const plaintext = codec.encode(payload);
  let reqKey; let replyKey; let wrapped = null;
  if (alg === ALG_RSA) {
    if (!rsa) throw new TypeError(`${ALG_RSA} needs an RSA public key`);
    reqKey = key ?? randomBytes(32);
    replyKey = reqKey;
    wrapped = await rsaWrap(rsa, reqKey);
  } else if (alg === ALG_SK) {
    if (!ks) throw new TypeError(`${ALG_SK} needs the session key`);
    [reqKey, replyKey] = await Promise.all([skRequestKey(ks, mid), skReplyKey(ks, mid)]);
  } else {
    throw new TypeError(`alg must be ${ALG_SK} or ${ALG_RSA}`);
  }
  const { iv, ct, tag } = await gcmSeal(reqKey, plaintext, requestAad(alg, sid, mid, ts, type));
  const env = { v: 1, alg, sid, mid, ts, type, iv: codec.wireBytes(iv), encryptedData: codec.wireBytes(ct), authTag: codec.wireBytes(tag) };
  if (wrapped) env.encryptedAesKey = codec.wireBytes(wrapped);
  if (kid !== undefined) env.kid = kid;
  return { env, mid, ts, alg, sid, type, codec, replyKey };
}

/** A request's stream-entry value: the envelope in its encoding. */
export function encodeEnvelope(sealed) {
  return sealed.codec.encode(sealed.env);
}

/**
 * Strictly decode a reply entry (an array of [fieldName, bytes]) as the Python
 * client's wire.decode_reply does; DecodeError when it is not the protocol's.
 */
export function decodeReplyEntry(fields) {
  if (fields.length !== 1) throw new DecodeError('a reply entry has exactly one field');
  const [name, raw] = fields[0];
  const codec = CODECS[name];
  if (!codec || !Object.hasOwn(CODECS, name)) throw new DecodeError('a reply entry field is e or j');
  if (raw.length + 1 > MAX_ENTRY_SIZE) throw new DecodeError('the reply entry is over the size limit');
  const env = codec.decode(raw, { floats: 'wrap' });
  if (!isPlainMap(env) || !isInt(env.v) || env.v !== 1) throw new DecodeError('not a version 1 reply');
  if (typeof env.sid !== 'string' || !HEX32.test(env.sid) || typeof env.mid !== 'string' || !HEX32.test(env.mid)) {
    throw new DecodeError('reply ids are not well formed');
  }
  if (typeof env.status !== 'string' || !STATUSES.has(env.status)) throw new DecodeError('reply status is not well formed');
  const hasAlg = Object.hasOwn(env, 'alg');
  if (hasAlg && env.alg !== ALG_RSA && env.alg !== ALG_SK) throw new DecodeError('unknown alg');
  const base = ['v', 'sid', 'mid', 'status', ...(hasAlg ? ['alg'] : [])];
  const same = (want) => {
    const got = Object.keys(env);
    return got.length === want.length && want.every((k) => Object.hasOwn(env, k));
  };
  const reply = { field: name, sid: env.sid, mid: env.mid, status: env.status, alg: hasAlg ? env.alg : null };
  if (env.status === 'rejected') {
    if (!same([...base, 'code']) || typeof env.code !== 'string' || !NOTICE_CODES.has(env.code)) {
      throw new DecodeError('a rejected notice has exactly a known code');
    }
    return { ...reply, code: env.code };
  }
  if (!hasAlg || !same([...base, 'iv', 'encryptedData', 'authTag'])) throw new DecodeError('reply fields are not the protocol\'s');
  const iv = codec.bytes(env.iv, 'iv');
  const ct = codec.bytes(env.encryptedData, 'encryptedData');
  const tag = codec.bytes(env.authTag, 'authTag');
  if (iv.length !== IV_SIZE || tag.length !== TAG_SIZE) throw new DecodeError('iv must be 12 bytes and authTag 16 bytes');
  return { ...reply, iv, ct, tag };
}

/**
 * Authenticate and open a decoded reply to `sealed`. Returns a Result-like object
 * { mid, type, status, value?, code?, message?, authenticated }. A notice is
 * returned as is (unauthenticated); anything sealed that does not open, or opens
 * to something that is not the protocol's, is one OpenError.
 */
export async function openReply(sealed, reply) {
  const { mid, type } = sealed;
  if (reply.status === 'rejected') {
    if (reply.alg !== null && reply.alg !== sealed.alg) throw new OpenError();
    return { mid, type, status: 'rejected', code: reply.code, authenticated: false };
  }
  if (reply.alg !== sealed.alg || reply.field !== sealed.codec.field || reply.sid !== sealed.sid || reply.mid !== mid) {
    throw new OpenError();
  }
  const pt = await gcmOpen(sealed.replyKey, reply.iv, reply.ct, reply.tag, replyAad(sealed.alg, sealed.sid, mid, reply.status));
  let value;
  try {
    value = sealed.codec.decode(pt, { floats: 'wrap' });
  } catch {
    throw new OpenError();
  }
  if (reply.status === 'error') {
    const keys = isPlainMap(value) ? Object.keys(value).sort() : [];
    if (keys.length !== 2 || keys[0] !== 'code' || keys[1] !== 'message'
        || typeof value.code !== 'string' || typeof value.message !== 'string') {
      throw new OpenError();
    }
    return { mid, type, status: 'error', code: value.code, message: value.message, authenticated: true };
  }
  return { mid, type, status: 'ok', value, authenticated: true };
}

export { WireFloat, unwrapFloats };
export {
  ALG_RSA, ALG_SK, HANDSHAKE_TYPE, OpenError, deriveSessionKey, hkdf32, importRsaPublicKey, kidOf,
  replyAad, requestAad, skReplyKey, skRequestKey, x25519KeyPair,
} from './crypto.js';
export { CODECS, DecodeError, b64decode, b64encode, decodeJson, decodeMsgpack, encodeJson, encodeMsgpack } from './codec.js';
