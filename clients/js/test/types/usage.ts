// Compiled (not run) by test/types.test.mjs: the declarations describe the API as used.
import {
  ALG_RSA, ALG_SK, Client, GatewayTransport, RemoteError, type Result, type SessionGrant,
} from 'sealstream-client';
import { RedisTransport } from 'sealstream-client/redis';

async function usage(kid: string): Promise<void> {
  const transport = await RedisTransport.connect('redis://127.0.0.1:6379/0', { prefix: 'sealstream' });
  const client = new Client(transport, { kid, encoding: 'e' });
  const session = await client.session({ alg: ALG_SK, ttl: 600 });
  const echoed: { a: number } = await session.request<{ a: number }>('echo', { a: 1 }, { timeoutMs: 1000, alg: ALG_RSA });
  const mid: string = await session.submit('echo', { a: echoed.a }, { encoding: 'j' });
  for await (const result of session.replies()) {
    const r: Result = result;
    if (r.mid === mid) break;
  }
  try {
    await session.request('nope', {});
  } catch (err) {
    if (err instanceof RemoteError) console.log(err.code, err.remoteMessage, err.messageId);
  }
  await session.close();
  await transport.close();
  const grant: SessionGrant = await new Client(new GatewayTransport('https://gw.example'), { kid, encoding: 'j' }).handshake();
  console.log(grant.sid, grant.expiresAt);
}

void usage;
