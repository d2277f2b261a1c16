// The client over the direct Redis transport, against a real Redis and a real worker.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { ALG_RSA, ALG_SK, Client, RemoteError } from '../src/index.js';
import { RedisTransport } from '../src/redis.js';
import { collectingLogger, startRig } from './harness.mjs';

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

const PAYLOAD = { hello: 'node', n: 42, list: [1, 2.5, 'x'], bin: null, nested: { deep: true } };

for (const encoding of ['e', 'j']) {
  for (const alg of [ALG_SK, ALG_RSA]) {
    test(`echo round trip, ${alg}, encoding ${encoding}`, async () => {
      /** A handshake then a request, answered by the worker, in this alg and encoding. */
      const client = new Client(transport, { kid: rig.kid, encoding, logger: collectingLogger() });
      const session = await client.session({ alg, ttl: 600 });
      try {
        assert.deepEqual(await session.request('echo', PAYLOAD, { timeoutMs: 15000 }), PAYLOAD);
      } finally {
        await session.close();
      }
    });
  }
}

test('binary values travel as bytes in MessagePack', async () => {
  /** A Uint8Array payload comes back as the same bytes (encoding e). */
  const client = new Client(transport, { kid: rig.kid });
  const session = await client.session();
  try {
    const bytes = Uint8Array.from([0, 1, 2, 255]);
    assert.deepEqual(await session.request('echo', { b: bytes }), { b: bytes });
  } finally {
    await session.close();
  }
});

test('an unknown handler type is a RemoteError unknown_type', async () => {
  /** The worker's authenticated error reply surfaces as RemoteError with its code. */
  const client = new Client(transport, { kid: rig.kid });
  const session = await client.session();
  try {
    await assert.rejects(session.request('nope', {}), (err) => err instanceof RemoteError && err.code === 'unknown_type');
  } finally {
    await session.close();
  }
});

test('submitted requests are answered through replies()', async () => {
  /** Three submits (mixed algs and encodings) give three results, matched by mid. */
  const client = new Client(transport, { kid: rig.kid });
  const session = await client.session();
  try {
    const mids = new Map();
    mids.set(await session.submit('echo', { i: 0 }), 0);
    mids.set(await session.submit('echo', { i: 1 }, { alg: ALG_RSA }), 1);
    mids.set(await session.submit('echo', { i: 2 }, { encoding: 'j' }), 2);
    const seen = new Map();
    for await (const result of session.replies()) {
      seen.set(result.mid, result.unwrap().i);
      if (seen.size === 3) break;
    }
    assert.deepEqual(seen, mids);
    assert.equal(session.outstanding, 0);
  } finally {
    await session.close();
  }
});

test('at most maxInFlight requests wait for replies at once', async () => {
  /** With maxInFlight 1, a second submit waits until the first request's reply has arrived. */
  const client = new Client(transport, { kid: rig.kid });
  const session = await client.session({ maxInFlight: 1 });
  try {
    await session.submit('sleep', { ms: 200 });
    let second = false;
    const pending = session.submit('echo', { n: 2 }).then((mid) => { second = true; return mid; });
    const iterator = session.replies()[Symbol.asyncIterator]();
    const first = (await iterator.next()).value;
    assert.deepEqual([false, { slept: 200 }], [second, first.value]);
    const mid = await pending;
    const last = (await iterator.next()).value;
    assert.deepEqual([mid, { n: 2 }], [last.mid, last.value]);
  } finally {
    await session.close();
  }
});
