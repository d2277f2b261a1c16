// The protocol's cryptography on WebCrypto (crypto.subtle): one code base for
// Node >= 20 and current browsers. A narrow surface: every failure to open a
// sealed value is one opaque error, as in the Python package.

import { ProtocolError } from './errors.js';
import { b64decode } from './codec.js';

export const PROTO = 'sealstream/1';
export const ALG_RSA = 'RSA-OAEP-256+A256GCM';
export const ALG_SK = 'SK+A256GCM';
export const ALGORITHMS = Object.freeze([ALG_RSA, ALG_SK]);
export const HANDSHAKE_TYPE = 'sealstream.handshake';
export const KEY_SIZE = 32;
export const IV_SIZE = 12;
export const TAG_SIZE = 16;

const ascii = new TextEncoder();

function subtle() {
  const s = globalThis.crypto?.subtle;
  if (!s) throw new ProtocolError('WebCrypto (crypto.subtle) is not available: Node >= 20 or a secure browser context is needed');
  return s;
}

/** Thrown when a sealed value does not open; says nothing more on purpose. */
export class OpenError extends ProtocolError {
  constructor() { super('cannot open'); }
}

export function randomBytes(n) {
  return globalThis.crypto.getRandomValues(new Uint8Array(n));
}

export function toHex(u8) {
  let s = '';
  for (const x of u8) s += x.toString(16).padStart(2, '0');
  return s;
}

/** A fresh sid/mid: 16 random bytes as 32 lowercase hex chars. */
export const newId = () => toHex(randomBytes(16));

export function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) { out.set(p, o); o += p.length; }
  return out;
}

export const requestAad = (alg, sid, mid, ts, type) => `${PROTO}|req|${alg}|${sid}|${mid}|${ts}|${type}`;
export const replyAad = (alg, sid, mid, status) => `${PROTO}|rep|${alg}|${sid}|${mid}|${status}`;

/** HKDF-SHA256 with an empty salt, 32 bytes. */
export async function hkdf32(ikm, info) {
  const s = subtle();
  const key = await s.importKey('raw', ikm, 'HKDF', false, ['deriveBits']);
  const bits = await s.deriveBits({ name: 'HKDF', hash: 'SHA-256', salt: new Uint8Array(0), info: ascii.encode(info) }, key, 256);
  return new Uint8Array(bits);
}

export const skRequestKey = (ks, mid) => hkdf32(ks, `${PROTO} req ${mid}`);
export const skReplyKey = (ks, mid) => hkdf32(ks, `${PROTO} rep ${mid}`);

/** AES-256-GCM seal: returns { iv, ct, tag } with a fresh 12-byte iv. */
export async function gcmSeal(key, plaintext, aad) {
  const s = subtle();
  const iv = randomBytes(IV_SIZE);
  const k = await s.importKey('raw', key, 'AES-GCM', false, ['encrypt']);
  const out = new Uint8Array(await s.encrypt({ name: 'AES-GCM', iv, additionalData: ascii.encode(aad), tagLength: 128 }, k, plaintext));
  return { iv, ct: out.slice(0, out.length - TAG_SIZE), tag: out.slice(out.length - TAG_SIZE) };
}

/** AES-256-GCM open; OpenError on any failure. */
export async function gcmOpen(key, iv, ct, tag, aad) {
  const s = subtle();
  try {
    const k = await s.importKey('raw', key, 'AES-GCM', false, ['decrypt']);
    const pt = await s.decrypt({ name: 'AES-GCM', iv, additionalData: ascii.encode(aad), tagLength: 128 }, k, concat(ct, tag));
    return new Uint8Array(pt);
  } catch {
    throw new OpenError();
  }
}

/** The DER of a PEM "PUBLIC KEY" (SPKI). */
export function pemToSpki(pem) {
  if (typeof pem !== 'string') throw new ProtocolError('a public key must be a PEM string');
  const m = /^\s*-----BEGIN PUBLIC KEY-----\r?\n([A-Za-z0-9+/=\r\n]+)-----END PUBLIC KEY-----\s*$/.exec(pem);
  if (!m) throw new ProtocolError('not a PEM public key (SPKI)');
  try {
    return b64decode(m[1].replace(/[\r\n]/g, ''));
  } catch {
    throw new ProtocolError('not a PEM public key (SPKI)');
  }
}

/** kid = SHA-256 of the SPKI DER, as 64 lowercase hex chars. */
export async function kidOf(spkiDer) {
  return toHex(new Uint8Array(await subtle().digest('SHA-256', spkiDer)));
}

/** An RSA-OAEP-256 public key from PEM SPKI; refuses keys under 2048 bits. */
export async function importRsaPublicKey(pem, what = 'public key') {
  const der = pemToSpki(pem);
  let key;
  try {
    key = await subtle().importKey('spki', der, { name: 'RSA-OAEP', hash: 'SHA-256' }, false, ['encrypt']);
  } catch {
    throw new ProtocolError(`${what} is not an RSA public key`);
  }
  const bits = key.algorithm.modulusLength;
  if (bits < 2048) throw new ProtocolError(`${what} has ${bits} bits, fewer than 2048`);
  return { key, der, bits, kid: await kidOf(der) };
}

/** RSA-OAEP (SHA-256, MGF1-SHA-256, empty label) of a 32-byte key. */
export async function rsaWrap(rsa, k) {
  return new Uint8Array(await subtle().encrypt({ name: 'RSA-OAEP' }, rsa.key, k));
}

/** A fresh X25519 key pair: { privateKey, raw } (raw = 32-byte public key). */
export async function x25519KeyPair() {
  const s = subtle();
  const pair = await s.generateKey({ name: 'X25519' }, true, ['deriveBits']);
  return { privateKey: pair.privateKey, raw: new Uint8Array(await s.exportKey('raw', pair.publicKey)) };
}

/** Ks = HKDF(Kb || X25519(Ec, Ew), info = "sealstream/1 session|sid|hex Ec|hex Ew"). */
export async function deriveSessionKey(kb, ecPrivate, ecRaw, ewRaw, sid) {
  const s = subtle();
  let shared;
  try {
    const peer = await s.importKey('raw', ewRaw, { name: 'X25519' }, false, []);
    shared = new Uint8Array(await s.deriveBits({ name: 'X25519', public: peer }, ecPrivate, 256));
  } catch {
    throw new ProtocolError('the server ephemeral key is not a usable X25519 key');
  }
  if (shared.every((x) => x === 0)) throw new ProtocolError('the server ephemeral key is of low order');
  return hkdf32(concat(kb, shared), `${PROTO} session|${sid}|${toHex(ecRaw)}|${toHex(ewRaw)}`);
}
