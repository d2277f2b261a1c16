// The direct transport for Node: requests and replies through Redis itself, with
// node-redis (npm `redis`). Browsers use GatewayTransport instead.
//
//   import { RedisTransport } from 'sealstream-client/redis';
//   const transport = await RedisTransport.connect('redis://127.0.0.1:6379/0');

import { createClient } from 'redis';
import { ConfigError, ProtocolError } from './errors.js';

const sleep = (ms, signal) => new Promise((resolve) => {
  const t = setTimeout(resolve, ms);
  signal?.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
});

const asU8 = (buf) => new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength);

/** Requests to P:req:{n}, replies from P:{sid}:reply, config from P:config. */
export class RedisTransport {
  /** Connect to `url`; the transport owns (and close() ends) the connection. */
  static async connect(url, { prefix = 'sealstream', shards } = {}) {
    const redis = createClient({ url, socket: { connectTimeout: 5000 } });
    redis.on('error', () => { /* reconnects by itself; failures surface through commands */ });
    await redis.connect();
    return new RedisTransport(redis, { prefix, shards, owned: true });
  }

  /** Wrap a connected node-redis v4 client (not closed by close() unless `owned`). */
  constructor(redis, { prefix = 'sealstream', shards, owned = false } = {}) {
    if (!prefix || /[{} \n]/.test(prefix)) throw new ConfigError('prefix must be non-empty, without braces or spaces');
    if (shards !== undefined && (!Number.isInteger(shards) || shards < 1)) throw new ConfigError('shards must be a positive integer');
    this.redis = redis;
    this.prefix = prefix;
    this.encodings = ['e', 'j'];
    this._shards = shards;
    this._owned = owned;
  }

  configKey() { return `${this.prefix}:config`; }
  requestStream(shard) { return `${this.prefix}:req:{${shard}}`; }
  replyStream(sid) { return `${this.prefix}:{${sid}}:reply`; }

  /** P:config as { kid, servicePublicKey, shards }. */
  async config() {
    const raw = await this.redis.hGetAll(this.configKey());
    const config = { kid: raw.kid, servicePublicKey: raw.servicePublicKey, shards: undefined };
    if (raw.shards !== undefined) {
      if (!/^[1-9][0-9]{0,3}$/.test(raw.shards)) throw new ProtocolError(`${this.configKey()} shards is not a positive integer`);
      config.shards = Number(raw.shards);
    }
    if (this._shards === undefined) this._shards = config.shards ?? 1;
    return config;
  }

  async shards() {
    if (this._shards === undefined) await this.config();
    return this._shards;
  }

  /** XADD one request entry to its default shard (int(mid[:8], 16) % shards); its id. */
  async send(field, bytes, mid) {
    const shard = parseInt(mid.slice(0, 8), 16) % await this.shards();
    const id = await this.redis.sendCommand(['XADD', this.requestStream(shard), '*', field, Buffer.from(bytes)]);
    return String(id);
  }

  /**
   * Batches of reply entries after `after`, read on a connection of their own
   * (XREAD BLOCK holds it). Rides out Redis blips; ends when `signal` aborts.
   */
  async *subscribe(sid, { after = '0-0', signal } = {}) {
    const key = this.replyStream(sid);
    const conn = this.redis.duplicate();
    conn.on('error', () => {});
    const stop = () => { conn.disconnect().catch(() => {}); };
    signal?.addEventListener('abort', stop, { once: true });
    let delay = 50;
    try {
      await conn.connect();
      while (!signal?.aborted) {
        let batch;
        try {
          batch = await this._read(conn, key, after);
          delay = 50;
        } catch (err) {
          if (signal?.aborted) return;
          await sleep(delay * (0.5 + Math.random()), signal);
          delay = Math.min(delay * 2, 2000);
          continue;
        }
        if (batch.length) after = batch[batch.length - 1].id;
        if (batch.length) yield batch;
      }
    } finally {
      signal?.removeEventListener('abort', stop);
      if (conn.isOpen) await conn.disconnect().catch(() => {});
    }
  }

  /** One XREAD (up to 100 entries, blocking up to 1 s) as [{ id, fields }]. */
  async _read(conn, key, after) {
    const res = await conn.sendCommand(['XREAD', 'COUNT', '100', 'BLOCK', '1000', 'STREAMS', key, after], { returnBuffers: true });
    const batch = [];
    for (const [, entries] of res ?? []) {
      for (const [idBuf, flat] of entries) {
        const fields = [];
        for (let f = 0; f + 1 < flat.length; f += 2) fields.push([flat[f].toString('latin1'), asU8(flat[f + 1])]);
        batch.push({ id: idBuf.toString(), fields });
      }
    }
    return batch;
  }

  async close() {
    if (this._owned && this.redis.isOpen) await this.redis.quit();
  }
}
