#!/usr/bin/env node
// Offline self-checks of client.mjs primitives against hand computations and published
// test vectors (RFC 5869, RFC 7748). No Redis, no worker. Exit 0 when all pass.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { encode } from '@msgpack/msgpack';
import {
  ALG_RSA, ALG_SK, CODECS, WireFloat, buildRequest, decodeCanonicalBase64, decodeStrictJson,
  decodeStrictMsgpack, deriveKs, gcmOpen, hkdf32, openReply, replyAad, requestAad,
  sessionInfo, skReplyKey, skRequestKey, x25519PublicFromRaw, x25519RawPublic,
} from './client.mjs';

let n = 0;
const t = (name, fn) => { fn(); n++; console.log(`ok - ${name}`); };
const hex = (s) => Buffer.from(s, 'hex');

// Hand-rolled HKDF (RFC 5869) on top of HMAC, to cross-check node's hkdfSync.
function hkdfByHand(ikm, salt, info, len) {
  const prk = crypto.createHmac('sha256', salt.length ? salt : Buffer.alloc(32)).update(ikm).digest();
  let tPrev = Buffer.alloc(0); const outs = [];
  for (let i = 1; Buffer.concat(outs).length < len; i++) {
    tPrev = crypto.createHmac('sha256', prk).update(Buffer.concat([tPrev, Buffer.from(info), Buffer.from([i])])).digest();
    outs.push(tPrev);
  }
  return Buffer.concat(outs).subarray(0, len);
}

const sid = '00112233445566778899aabbccddeeff';
const mid = '5be1a0b1c2d3e4f5061728394a5b6c7d';

t('request AAD string', () => {
  assert.equal(requestAad(ALG_SK, sid, mid, 1700000000123, 'echo'),
    'sealstream/1|req|SK+A256GCM|00112233445566778899aabbccddeeff|5be1a0b1c2d3e4f5061728394a5b6c7d|1700000000123|echo');
  assert.equal(requestAad(ALG_RSA, sid, mid, 5, 'sealstream.handshake'),
    `sealstream/1|req|RSA-OAEP-256+A256GCM|${sid}|${mid}|5|sealstream.handshake`);
});
t('reply AAD string', () => {
  assert.equal(replyAad(ALG_RSA, sid, mid, 'ok'), `sealstream/1|rep|RSA-OAEP-256+A256GCM|${sid}|${mid}|ok`);
  assert.equal(replyAad(ALG_SK, sid, mid, 'error'), `sealstream/1|rep|SK+A256GCM|${sid}|${mid}|error`);
});
t('HKDF RFC 5869 test case 1 and 3 (node hkdfSync and by hand)', () => {
  const ikm = Buffer.alloc(22, 0x0b);
  const tc1 = Buffer.from(crypto.hkdfSync('sha256', ikm, hex('000102030405060708090a0b0c'), hex('f0f1f2f3f4f5f6f7f8f9'), 42));
  assert.equal(tc1.toString('hex'), '3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865');
  assert.equal(hkdfByHand(ikm, hex('000102030405060708090a0b0c'), hex('f0f1f2f3f4f5f6f7f8f9'), 42).toString('hex'), tc1.toString('hex'));
  const tc3 = Buffer.from(crypto.hkdfSync('sha256', ikm, Buffer.alloc(0), Buffer.alloc(0), 42));
  assert.equal(tc3.toString('hex'), '8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8');
});
t('SK request/reply keys = HKDF(Ks, "", "sealstream/1 req|rep " + mid)', () => {
  const ks = crypto.createHash('sha256').update('ks').digest();
  assert.deepEqual(skRequestKey(ks, mid), hkdfByHand(ks, Buffer.alloc(0), `sealstream/1 req ${mid}`, 32));
  assert.deepEqual(skReplyKey(ks, mid), hkdfByHand(ks, Buffer.alloc(0), `sealstream/1 rep ${mid}`, 32));
  assert.notDeepEqual(skRequestKey(ks, mid), skReplyKey(ks, mid));
});
t('X25519 RFC 7748 6.1 and Ks derivation', () => {
  const aPriv = hex('77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a');
  const aPub = hex('8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a');
  const bPub = hex('de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f');
  const shared = hex('4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742');
  const priv = crypto.createPrivateKey({ key: { kty: 'OKP', crv: 'X25519', d: aPriv.toString('base64url'), x: aPub.toString('base64url') }, format: 'jwk' });
  assert.deepEqual(x25519RawPublic(crypto.createPublicKey(priv)), aPub);
  assert.deepEqual(crypto.diffieHellman({ privateKey: priv, publicKey: x25519PublicFromRaw(bPub) }), shared);
  const kb = Buffer.alloc(32, 7);
  const info = sessionInfo(sid, aPub, bPub);
  assert.equal(info, `sealstream/1 session|${sid}|8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a|de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f`);
  assert.deepEqual(deriveKs(kb, priv, aPub, bPub, sid), hkdfByHand(Buffer.concat([kb, shared]), Buffer.alloc(0), info, 32));
  assert.throws(() => deriveKs(kb, priv, aPub, Buffer.alloc(32, 0), sid)); // low order point
});
t('canonical base64', () => {
  assert.deepEqual(decodeCanonicalBase64('QQ=='), Buffer.from('A'));
  assert.deepEqual(decodeCanonicalBase64(''), Buffer.alloc(0));
  for (const bad of ['QR==', 'QQ', 'QQ=', 'Q Q==', 'QQ==\n', 'QQ-_', '====', 'QUJD\n']) assert.throws(() => decodeCanonicalBase64(bad), bad);
});
t('strict JSON', () => {
  const v = decodeStrictJson(Buffer.from('{"a":1,"b":[true,null,"x\\u00e9"],"c":1.0,"__proto__":2}'));
  assert.equal(v.a, 1); assert.ok(v.c instanceof WireFloat); assert.equal(Object.getPrototypeOf(v), Object.prototype);
  assert.ok(Object.hasOwn(v, '__proto__'));
  for (const bad of ['{"a":1,"a":2}', '{"a":1} x', '{"a":NaN}', '[1e999]', '\ufeff{}', '{"a":"\\ud800"}', "{'a':1}", '{"a":1,}', '01', '"\u0001"', '']) {
    assert.throws(() => decodeStrictJson(Buffer.from(bad)), bad);
  }
  assert.throws(() => decodeStrictJson(Buffer.from([0x22, 0xff, 0x22])));
  assert.ok(decodeStrictJson(Buffer.from('1e2')) instanceof WireFloat);
});
t('strict MessagePack', () => {
  const obj = { v: 1, ts: 1700000000123, b: Buffer.from([1, 2]), s: 'é', n: -5, l: [1, 2, 3] };
  const v = decodeStrictMsgpack(Buffer.from(encode(obj)));
  assert.deepEqual(v, obj);
  assert.ok(decodeStrictMsgpack(Buffer.from(encode(1.5))) instanceof WireFloat);
  assert.ok(decodeStrictMsgpack(Buffer.from([0xcb, 0x3f, 0xf0, 0, 0, 0, 0, 0, 0])) instanceof WireFloat); // 1.0 as float64
  const dup = Buffer.from([0x82, 0xa1, 0x61, 0x01, 0xa1, 0x61, 0x02]);
  const intKey = Buffer.from([0x81, 0x01, 0x01]);
  const trailing = Buffer.from([0x01, 0x02]);
  const nan = Buffer.from([0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0]);
  const ext = Buffer.from([0xd4, 0x01, 0x00]);
  const badUtf8 = Buffer.from([0xa1, 0xff]);
  const trunc = Buffer.from([0x92, 0x01]);
  for (const bad of [dup, intKey, trailing, nan, ext, badUtf8, trunc, Buffer.from([0xc1]), Buffer.alloc(0)]) {
    assert.throws(() => decodeStrictMsgpack(bad), bad.toString('hex'));
  }
});
t('request envelope shape and local round trip (both algs, both encodings)', () => {
  const { publicKey, privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const ks = crypto.randomBytes(32);
  for (const codec of [CODECS.j, CODECS.e]) {
    for (const alg of [ALG_RSA, ALG_SK]) {
      const req = buildRequest({ alg, sid, codec, rsaPublicKey: publicKey, ks, type: 'echo', plaintext: { hello: 'node', n: 42 } });
      const wire = codec.decode(codec.encode(req.env));
      const want = ['alg', 'authTag', 'encryptedData', 'iv', 'mid', 'sid', 'ts', 'type', 'v', ...(alg === ALG_RSA ? ['encryptedAesKey'] : [])].sort();
      assert.deepEqual(Object.keys(wire).sort(), want);
      assert.equal(wire.v, 1); assert.ok(Number.isSafeInteger(wire.ts));
      const iv = codec.bytes(wire.iv, 'iv'); const tag = codec.bytes(wire.authTag, 'tag');
      assert.equal(iv.length, 12); assert.equal(tag.length, 16);
      // "worker" side, written from the spec
      let kReq; let kRep;
      if (alg === ALG_RSA) {
        const eak = codec.bytes(wire.encryptedAesKey, 'eak');
        assert.equal(eak.length, 256);
        kReq = crypto.privateDecrypt({ key: privateKey, padding: crypto.constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, eak);
        kRep = kReq;
      } else {
        kReq = hkdfByHand(ks, Buffer.alloc(0), `sealstream/1 req ${wire.mid}`, 32);
        kRep = hkdfByHand(ks, Buffer.alloc(0), `sealstream/1 rep ${wire.mid}`, 32);
      }
      const pt = gcmOpen(kReq, iv, codec.bytes(wire.encryptedData, 'ed'), tag, `sealstream/1|req|${alg}|${sid}|${wire.mid}|${wire.ts}|echo`);
      assert.deepEqual(codec.decode(pt), { hello: 'node', n: 42 });
      const riv = crypto.randomBytes(12);
      const c = crypto.createCipheriv('aes-256-gcm', kRep, riv);
      c.setAAD(Buffer.from(`sealstream/1|rep|${alg}|${sid}|${wire.mid}|ok`));
      const rct = Buffer.concat([c.update(pt), c.final()]);
      const reply = { v: 1, alg, sid, mid: wire.mid, status: 'ok', iv: riv, encryptedData: rct, authTag: c.getAuthTag() };
      assert.deepEqual(openReply(req, codec.encode(reply)).result, { hello: 'node', n: 42 });
      // strictness of reply checks
      assert.throws(() => openReply(req, codec.encode({ ...reply, status: 'error' })), /authentication/);
      assert.throws(() => openReply(req, codec.encode({ ...reply, extra: 1 })), /unexpected/);
      assert.throws(() => openReply(req, codec.encode({ ...reply, iv: crypto.randomBytes(16) })), /iv/);
      assert.throws(() => openReply(req, codec.encode({ ...reply, mid: sid })), /mid/);
      assert.throws(() => openReply(req, codec.encode({ ...reply, v: 2 })), /v must/);
      assert.throws(() => openReply(req, codec.encode({ ...reply, alg: alg === ALG_SK ? ALG_RSA : ALG_SK })), /alg/);
      const notice = { v: 1, alg, sid, mid: wire.mid, status: 'rejected', code: 'replay' };
      assert.deepEqual(openReply(req, codec.encode(notice)), { status: 'rejected', code: 'replay', authenticated: false });
      assert.throws(() => openReply(req, codec.encode({ ...notice, code: 'nope' })), /code/);
    }
  }
  // JSON-specific: non-canonical base64 in a reply is refused
  const req = buildRequest({ alg: ALG_SK, sid, codec: CODECS.j, ks, type: 'echo', plaintext: {} });
  const bad = Buffer.from(JSON.stringify({ v: 1, alg: ALG_SK, sid, mid: req.mid, status: 'ok', iv: 'AAAAAAAAAAAAAAAA\n', encryptedData: '', authTag: 'AAAAAAAAAAAAAAAAAAAAAA==' }));
  assert.throws(() => openReply(req, bad), /canonical/);
  const floatV = Buffer.from(JSON.stringify({ v: 1, alg: ALG_SK, sid, mid: req.mid, status: 'rejected', code: 'rejected' }).replace('"v":1', '"v":1.0'));
  assert.throws(() => openReply(req, floatV), /v must/);
});
console.log(`selftest: ${n} groups passed`);
