#!/usr/bin/env node
// Offline checks of the JavaScript client's primitives (clients/js, on WebCrypto)
// against hand computations, published test vectors (RFC 5869, RFC 7748) and an
// independent "worker side" written here with node:crypto. No Redis, no worker.
// Exit 0 when all pass.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import {
  ALG_RSA, ALG_SK, CODECS, WireFloat, b64decode, decodeJson, decodeMsgpack, decodeReplyEntry,
  deriveSessionKey, encodeMsgpack, hkdf32, importRsaPublicKey, openReply, replyAad, requestAad,
  sealRequest, skReplyKey, skRequestKey,
} from 'sealstream-client/protocol';

let n = 0;
const t = async (name, fn) => { await fn(); n++; console.log(`ok - ${name}`); };
const hex = (s) => Buffer.from(s, 'hex');
const u8 = (b) => new Uint8Array(b);

// Hand-rolled HKDF (RFC 5869) on top of HMAC, to cross-check WebCrypto's.
function hkdfByHand(ikm, salt, info, len) {
  const prk = crypto.createHmac('sha256', salt.length ? salt : Buffer.alloc(32)).update(ikm).digest();
  let tPrev = Buffer.alloc(0); const outs = [];
  for (let i = 1; Buffer.concat(outs).length < len; i++) {
    tPrev = crypto.createHmac('sha256', prk).update(Buffer.concat([tPrev, Buffer.from(info), Buffer.from([i])])).digest();
    outs.push(tPrev);
  }
  return u8(Buffer.concat(outs).subarray(0, len));
}

const sid = '00112233445566778899aabbccddeeff';
const mid = '5be1a0b1c2d3e4f5061728394a5b6c7d';

await t('request AAD string', () => {
  assert.equal(requestAad(ALG_SK, sid, mid, 1700000000123, 'echo'),
    'sealstream/1|req|SK+A256GCM|00112233445566778899aabbccddeeff|5be1a0b1c2d3e4f5061728394a5b6c7d|1700000000123|echo');
  assert.equal(requestAad(ALG_RSA, sid, mid, 5, 'sealstream.handshake'),
    `sealstream/1|req|RSA-OAEP-256+A256GCM|${sid}|${mid}|5|sealstream.handshake`);
});
await t('reply AAD string', () => {
  assert.equal(replyAad(ALG_RSA, sid, mid, 'ok'), `sealstream/1|rep|RSA-OAEP-256+A256GCM|${sid}|${mid}|ok`);
  assert.equal(replyAad(ALG_SK, sid, mid, 'error'), `sealstream/1|rep|SK+A256GCM|${sid}|${mid}|error`);
});
await t('HKDF RFC 5869 test case 3 (WebCrypto, empty salt) and by hand', async () => {
  const ikm = Buffer.alloc(22, 0x0b);
  const tc3 = await hkdf32(ikm, '');
  assert.equal(Buffer.from(tc3).toString('hex'), '8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d');
  assert.deepEqual(tc3, hkdfByHand(ikm, Buffer.alloc(0), '', 32));
});
await t('SK request/reply keys = HKDF(Ks, "", "sealstream/1 req|rep " + mid)', async () => {
  const ks = u8(crypto.createHash('sha256').update('ks').digest());
  assert.deepEqual(await skRequestKey(ks, mid), hkdfByHand(ks, Buffer.alloc(0), `sealstream/1 req ${mid}`, 32));
  assert.deepEqual(await skReplyKey(ks, mid), hkdfByHand(ks, Buffer.alloc(0), `sealstream/1 rep ${mid}`, 32));
  assert.notDeepEqual(await skRequestKey(ks, mid), await skReplyKey(ks, mid));
});
await t('X25519 RFC 7748 6.1 and Ks derivation', async () => {
  const aPriv = hex('77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a');
  const aPub = hex('8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a');
  const bPub = hex('de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f');
  const shared = hex('4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742');
  const priv = await crypto.subtle.importKey('jwk', { kty: 'OKP', crv: 'X25519', d: aPriv.toString('base64url'), x: aPub.toString('base64url') }, { name: 'X25519' }, false, ['deriveBits']);
  const kb = u8(Buffer.alloc(32, 7));
  const info = `sealstream/1 session|${sid}|${aPub.toString('hex')}|${bPub.toString('hex')}`;
  assert.deepEqual(await deriveSessionKey(kb, priv, u8(aPub), u8(bPub), sid), hkdfByHand(Buffer.concat([kb, shared]), Buffer.alloc(0), info, 32));
  await assert.rejects(deriveSessionKey(kb, priv, u8(aPub), new Uint8Array(32), sid)); // low order point
});
await t('canonical base64', () => {
  assert.deepEqual(b64decode('QQ=='), u8(Buffer.from('A')));
  assert.deepEqual(b64decode(''), new Uint8Array(0));
  for (const bad of ['QR==', 'QQ', 'QQ=', 'Q Q==', 'QQ==\n', 'QQ-_', '====', 'QUJD\n']) assert.throws(() => b64decode(bad), bad);
});
await t('strict JSON', () => {
  const v = decodeJson(Buffer.from('{"a":1,"b":[true,null,"x\\u00e9"],"c":1.0,"__proto__":2}'), { floats: 'wrap' });
  assert.equal(v.a, 1); assert.ok(v.c instanceof WireFloat); assert.equal(Object.getPrototypeOf(v), Object.prototype);
  assert.ok(Object.hasOwn(v, '__proto__'));
  for (const bad of ['{"a":1,"a":2}', '{"a":1} x', '{"a":NaN}', '[1e999]', '\ufeff{}', '{"a":"\\ud800"}', "{'a':1}", '{"a":1,}', '01', '"\u0001"', '']) {
    assert.throws(() => decodeJson(Buffer.from(bad)), bad);
  }
  assert.throws(() => decodeJson(Buffer.from([0x22, 0xff, 0x22])));
  assert.ok(decodeJson(Buffer.from('1e2'), { floats: 'wrap' }) instanceof WireFloat);
});
await t('strict MessagePack', () => {
  const obj = { v: 1, ts: 1700000000123, b: Uint8Array.from([1, 2]), s: 'é', n: -5, l: [1, 2, 3] };
  assert.deepEqual(decodeMsgpack(encodeMsgpack(obj)), obj);
  assert.ok(decodeMsgpack(encodeMsgpack(1.5), { floats: 'wrap' }) instanceof WireFloat);
  assert.ok(decodeMsgpack(u8([0xcb, 0x3f, 0xf0, 0, 0, 0, 0, 0, 0]), { floats: 'wrap' }) instanceof WireFloat); // 1.0 as float64
  const bad = [[0x82, 0xa1, 0x61, 0x01, 0xa1, 0x61, 0x02], [0x81, 0x01, 0x01], [0x01, 0x02], [0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0],
    [0xd4, 0x01, 0x00], [0xa1, 0xff], [0x92, 0x01], [0xc1], []];
  for (const b of bad) assert.throws(() => decodeMsgpack(u8(b)), Buffer.from(b).toString('hex'));
});
await t('request envelope shape and local round trip (both algs, both encodings)', async () => {
  const { publicKey, privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const rsa = await importRsaPublicKey(publicKey.export({ type: 'spki', format: 'pem' }));
  const ks = u8(crypto.randomBytes(32));
  for (const codec of [CODECS.j, CODECS.e]) {
    for (const alg of [ALG_RSA, ALG_SK]) {
      const sealed = await sealRequest({ alg, sid, codec, rsa, ks, type: 'echo', payload: { hello: 'node', n: 42 } });
      const wire = codec.decode(codec.encode(sealed.env));
      const want = ['alg', 'authTag', 'encryptedData', 'iv', 'mid', 'sid', 'ts', 'type', 'v', ...(alg === ALG_RSA ? ['encryptedAesKey'] : [])].sort();
      assert.deepEqual(Object.keys(wire).sort(), want);
      assert.equal(wire.v, 1); assert.ok(Number.isSafeInteger(wire.ts));
      const iv = codec.bytes(wire.iv, 'iv'); const tag = codec.bytes(wire.authTag, 'tag');
      assert.equal(iv.length, 12); assert.equal(tag.length, 16);
      // "worker" side, with node:crypto, written from the spec
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
      const d = crypto.createDecipheriv('aes-256-gcm', kReq, iv, { authTagLength: 16 });
      d.setAAD(Buffer.from(`sealstream/1|req|${alg}|${sid}|${wire.mid}|${wire.ts}|echo`));
      d.setAuthTag(tag);
      const pt = Buffer.concat([d.update(codec.bytes(wire.encryptedData, 'ed')), d.final()]);
      assert.deepEqual(codec.decode(pt), { hello: 'node', n: 42 });
      const riv = crypto.randomBytes(12);
      const c = crypto.createCipheriv('aes-256-gcm', kRep, riv, { authTagLength: 16 });
      c.setAAD(Buffer.from(`sealstream/1|rep|${alg}|${sid}|${wire.mid}|ok`));
      const rct = Buffer.concat([c.update(pt), c.final()]);
      const reply = { v: 1, alg, sid, mid: wire.mid, status: 'ok', iv: codec.wireBytes(u8(riv)), encryptedData: codec.wireBytes(u8(rct)), authTag: codec.wireBytes(u8(c.getAuthTag())) };
      const open = async (env) => openReply(sealed, decodeReplyEntry([[codec.field, codec.encode(env)]]));
      assert.deepEqual((await open(reply)).value, { hello: 'node', n: 42 });
      // strictness of reply checks
      await assert.rejects(open({ ...reply, status: 'error' }), /cannot open/);
      await assert.rejects(open({ ...reply, extra: 1 }), /fields/);
      await assert.rejects(open({ ...reply, iv: codec.wireBytes(u8(crypto.randomBytes(16))) }), /iv/);
      await assert.rejects(open({ ...reply, mid: sid }), /cannot open/);
      await assert.rejects(open({ ...reply, v: 2 }), /version 1/);
      await assert.rejects(open({ ...reply, alg: alg === ALG_SK ? ALG_RSA : ALG_SK }), /cannot open/);
      const notice = { v: 1, alg, sid, mid: wire.mid, status: 'rejected', code: 'replay' };
      assert.deepEqual(await open(notice), { mid: wire.mid, type: 'echo', status: 'rejected', code: 'replay', authenticated: false });
      await assert.rejects(open({ ...notice, code: 'nope' }), /code/);
    }
  }
  // JSON-specific: non-canonical base64 and a float v in a reply are refused
  const bad = Buffer.from(JSON.stringify({ v: 1, alg: ALG_SK, sid, mid, status: 'ok', iv: 'AAAAAAAAAAAAAAAA\n', encryptedData: '', authTag: 'AAAAAAAAAAAAAAAAAAAAAA==' }));
  assert.throws(() => decodeReplyEntry([['j', bad]]), /base64/);
  const floatV = Buffer.from(JSON.stringify({ v: 1, alg: ALG_SK, sid, mid, status: 'rejected', code: 'rejected' }).replace('"v":1', '"v":1.0'));
  assert.throws(() => decodeReplyEntry([['j', floatV]]), /version 1/);
});
console.log(`selftest: ${n} groups passed`);
