// Must NOT compile: the declarations are precise enough to catch these.
import { Client, GatewayTransport } from 'sealstream-client';

const client = new Client(new GatewayTransport('https://gw.example'), { kid: 'x', encoding: 'x' });
async function misuse(): Promise<void> {
  const session = await client.session({ alg: 'AES' });
  await session.request(42, {});
}
void misuse;
