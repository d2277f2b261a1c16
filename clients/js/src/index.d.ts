// Type declarations of sealstream-client (the package is plain ESM JavaScript).

export declare const ALG_RSA: 'RSA-OAEP-256+A256GCM';
export declare const ALG_SK: 'SK+A256GCM';
export declare const HANDSHAKE_TYPE: 'sealstream.handshake';

export type Alg = typeof ALG_RSA | typeof ALG_SK;
/** Stream-entry field: `e` MessagePack, `j` JSON. */
export type Encoding = 'e' | 'j';

/** One reply-stream entry as a transport reads it. */
export interface StreamEntry {
  id: string;
  fields: Array<[name: string, value: Uint8Array]>;
}

export interface ServiceConfig {
  kid?: string;
  servicePublicKey?: string;
  shards?: number;
}

/** What a Client needs from a transport (RedisTransport, GatewayTransport, or your own). */
export interface Transport {
  /** Encodings it can carry; absent means both. */
  readonly encodings?: readonly Encoding[];
  config(): Promise<ServiceConfig>;
  /** Add one request entry; resolves to its stream entry id. */
  send(field: Encoding, bytes: Uint8Array, mid: string, options?: { signal?: AbortSignal }): Promise<string>;
  /** Batches of reply entries after `after`, until `signal` aborts. */
  subscribe(sid: string, options?: { after?: string; signal?: AbortSignal }): AsyncIterable<StreamEntry[]>;
  close(): Promise<void>;
}

export interface Logger {
  /** `event` is snake_case; fields carry ids only, never keys or plaintext. */
  warn(event: string, fields?: Record<string, unknown>): void;
}
export declare const consoleLogger: Logger;

export interface ClientOptions {
  /** The pinned service kid: 64 lowercase hex chars (SHA-256 of the SPKI DER). */
  kid?: string;
  /** The service public key (PEM SPKI), instead of or besides the kid. */
  servicePublicKey?: string;
  /** Default encoding of requests (default `e`; the gateway carries only `j`). */
  encoding?: Encoding;
  logger?: Logger;
}

export interface SessionGrant {
  readonly sid: string;
  readonly publicKeyPem: string;
  readonly sessionKey: Uint8Array;
  readonly expiresAt: number;
}

export interface SessionOptions {
  /** Use this session instead of running a handshake. */
  grant?: SessionGrant;
  /** Default algorithm of requests (default SK+A256GCM). */
  alg?: Alg;
  /** Session lifetime asked for, in seconds (default 3600). */
  ttl?: number;
  /** Handshake timeout (default 30,000 ms). */
  timeoutMs?: number;
  /** Requests waiting for replies at once (default 500). */
  maxInFlight?: number;
}

export interface RequestOptions {
  alg?: Alg;
  encoding?: Encoding;
}

export declare class Client {
  constructor(transport: Transport, options?: ClientOptions);
  readonly transport: Transport;
  readonly kid: string | undefined;
  readonly encoding: Encoding;
  serviceKey(): Promise<{ kid: string; bits: number }>;
  handshake(options?: { ttl?: number; timeoutMs?: number }): Promise<SessionGrant>;
  session(options?: SessionOptions): Promise<Session>;
}

export declare class Result<T = unknown> {
  readonly mid: string;
  readonly type: string;
  readonly status: 'ok' | 'error' | 'rejected';
  readonly value: T | null;
  readonly code: string | null;
  readonly message: string | null;
  /** The value of an `ok` result; throws RemoteError or RequestRejected otherwise. */
  unwrap(): T;
}

export declare class Session {
  readonly sid: string;
  readonly alg: Alg;
  readonly grant: SessionGrant;
  readonly outstanding: number;
  request<T = unknown>(type: string, payload: unknown, options?: RequestOptions & { timeoutMs?: number }): Promise<T>;
  submit(type: string, payload: unknown, options?: RequestOptions): Promise<string>;
  replies(): AsyncIterableIterator<Result>;
  close(): Promise<void>;
}

export interface GatewayTransportOptions {
  /** A fetch to use instead of globalThis.fetch. */
  fetch?: typeof globalThis.fetch;
  /** Wait before reconnecting an event stream (the gateway's `retry:` overrides it). */
  reconnectMs?: number;
}

export declare class GatewayTransport implements Transport {
  constructor(baseUrl: string | URL, options?: GatewayTransportOptions);
  readonly baseUrl: string;
  readonly encodings: readonly ['j'];
  config(): Promise<ServiceConfig>;
  send(field: Encoding, bytes: Uint8Array, mid: string, options?: { signal?: AbortSignal }): Promise<string>;
  subscribe(sid: string, options?: { after?: string; signal?: AbortSignal }): AsyncIterableIterator<StreamEntry[]>;
  close(): Promise<void>;
}

export declare class SealstreamError extends Error {}
export declare class ConfigError extends SealstreamError {}
export declare class ProtocolError extends SealstreamError {}
export declare class DecodeError extends ProtocolError {}
export declare class ClientError extends SealstreamError {
  constructor(message: string, options?: { messageId?: string | null });
  readonly messageId: string | null;
}
export declare class RequestRejected extends ClientError {
  constructor(code: string, options?: { messageId?: string | null });
  readonly code: string;
}
export declare class RemoteError extends ClientError {
  constructor(code: string, remoteMessage: string, options?: { messageId?: string | null });
  readonly code: string;
  readonly remoteMessage: string;
}
export declare class ReplyTimeout extends ClientError {}
export declare class GatewayRefused extends ClientError {
  constructor(status: number, code: string, detail: string, options?: { messageId?: string | null });
  readonly status: number;
  readonly code: string;
  readonly detail: string;
}

/** A number that was a float on the wire (decoders with `{ floats: 'wrap' }`). */
export declare class WireFloat {
  constructor(value: number);
  readonly value: number;
}

export interface Codec {
  readonly field: Encoding;
  encode(value: unknown): Uint8Array;
  decode(bytes: Uint8Array, options?: { floats?: 'number' | 'wrap' }): unknown;
  bytes(value: unknown, what: string): Uint8Array;
  wireBytes(bytes: Uint8Array): Uint8Array | string;
}
export declare const CODECS: { readonly e: Codec; readonly j: Codec };
export declare function decodeJson(bytes: Uint8Array, options?: { floats?: 'number' | 'wrap' }): unknown;
export declare function decodeMsgpack(bytes: Uint8Array, options?: { floats?: 'number' | 'wrap' }): unknown;
export declare function encodeJson(value: unknown): Uint8Array;
export declare function encodeMsgpack(value: unknown): Uint8Array;
export declare function b64encode(bytes: Uint8Array): string;
export declare function b64decode(text: string): Uint8Array;
