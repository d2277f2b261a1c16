// The client through `sealstream gateway` (fetch + server-sent events), against a
// real gateway process, Redis and worker.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { ALG_RSA, ALG_SK, Client, ConfigError, GatewayRefused, GatewayTransport, RemoteError } from '../src/index.js';
import { startRig } from './harness.mjs';

let rig;
before(async () => { rig = await startRig({ gateway: true }); });
after(async () => { await rig?.stop(); });

for (const alg of [ALG_SK, ALG_RSA]) {
  test(`handshake and echo through the gateway, ${alg}`, async () => {
    /** The whole protocol over HTTP: config, handshake, request, reply event. */
    const client = new Client(new GatewayTransport(rig.gatewayUrl), { kid: rig.kid, encoding: 'j' });
    const session = await client.session({ alg, ttl: 600 });
    try {
      assert.deepEqual(await session.request('echo', { via: 'gateway', alg }), { via: 'gateway', alg });
      await assert.rejects(session.request('nope', {}), (e) => e instanceof RemoteError && e.code === 'unknown_type');
    } finally {
      await session.close();
    }
  });
}

test('a service key from the gateway that does not match the pin is refused', async () => {
  /** The gateway cannot substitute a key of its own: GET /v1/config is checked against the kid. */
  const client = new Client(new GatewayTransport(rig.gatewayUrl), { kid: '0'.repeat(64), encoding: 'j' });
  await assert.rejects(client.session(), ConfigError);
});

test('the gateway carries only the JSON encoding', () => {
  /** MessagePack envelopes cannot be POSTed: refused when the client is made. */
  assert.throws(() => new Client(new GatewayTransport(rig.gatewayUrl), { kid: rig.kid, encoding: 'e' }), ConfigError);
});

test('a refused POST is a GatewayRefused with the status and code', async () => {
  /** The gateway's 400 for a malformed envelope reaches the caller as is. */
  const transport = new GatewayTransport(rig.gatewayUrl);
  await assert.rejects(transport.send('j', new TextEncoder().encode('{"v":1}'), 'x'.repeat(32)),
    (e) => e instanceof GatewayRefused && e.status === 400 && e.code === 'malformed');
});

test('the reply reader resumes after a dropped connection, nothing lost or repeated', async () => {
  /** A fetch that cuts every event stream after its first event: replies still arrive, once each. */
  let cuts = 0;
  const cutting = async (url, init) => {
    const response = await fetch(url, init);
    if (!String(url).includes('/v1/replies/')) return response;
    const reader = response.body.getReader();
    const body = new ReadableStream({
      async pull(ctl) {
        const { value, done } = await reader.read();
        if (done) { ctl.close(); return; }
        ctl.enqueue(value);
        if (new TextDecoder().decode(value).includes('\nid: ') || new TextDecoder().decode(value).startsWith('id: ')) {
          cuts += 1;
          reader.cancel();
          ctl.error(new TypeError('connection dropped'));
        }
      },
    });
    return new Response(body, { status: response.status, headers: response.headers });
  };
  const seen = [];
  class Recording extends GatewayTransport {
    async *subscribe(sid, options) {
      for await (const batch of super.subscribe(sid, options)) {
        if (sid === session?.sid) seen.push(...batch.map((e) => e.id));
        yield batch;
      }
    }
  }
  let session;
  const client = new Client(new Recording(rig.gatewayUrl, { fetch: cutting, reconnectMs: 50 }), { kid: rig.kid, encoding: 'j' });
  session = await client.session();
  try {
    const mids = [];
    for (let i = 0; i < 5; i += 1) mids.push(await session.submit('echo', { i }));
    const got = [];
    for await (const r of session.replies()) {
      got.push(r.mid);
      if (got.length === 5) break;
    }
    assert.deepEqual([...mids].sort(), [...got].sort());
    assert.ok(cuts >= 2, `streams cut: ${cuts}`);
    const stream = await rig.redis.sendCommand(['XRANGE', `${rig.prefix}:{${session.sid}}:reply`, '-', '+']);
    // the session's reader saw each entry exactly once, in order (its first read may
    // have begun before this recorder knew the sid: compare the tail)
    assert.deepEqual(stream.map(([id]) => id).slice(-seen.length), seen);
    assert.ok(seen.length >= 5);
  } finally {
    await session.close();
  }
});
