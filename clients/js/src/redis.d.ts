import type { Encoding, ServiceConfig, StreamEntry, Transport } from './index.js';

export interface RedisTransportOptions {
  /** Key prefix P (default `sealstream`). */
  prefix?: string;
  /** Request shards (default: from P:config). */
  shards?: number;
}

/** Direct transport for Node: node-redis v4 (npm `redis`). */
export declare class RedisTransport implements Transport {
  /** Connect to `url`; close() ends the connection. */
  static connect(url: string, options?: RedisTransportOptions): Promise<RedisTransport>;
  /** Wrap a connected node-redis v4 client; close() leaves it open unless `owned`. */
  constructor(redis: unknown, options?: RedisTransportOptions & { owned?: boolean });
  readonly prefix: string;
  readonly encodings: readonly Encoding[];
  config(): Promise<ServiceConfig>;
  shards(): Promise<number>;
  send(field: Encoding, bytes: Uint8Array, mid: string, options?: { signal?: AbortSignal }): Promise<string>;
  subscribe(sid: string, options?: { after?: string; signal?: AbortSignal }): AsyncIterableIterator<StreamEntry[]>;
  close(): Promise<void>;
}
