// The protocol's building blocks, for conformance tools and tests: sealing a
// request, strictly decoding and opening a reply, and the primitives under them.
// Applications use Client (from 'sealstream-client') instead.
import type { Alg, Codec, Encoding } from './index.js';

export {
  ALG_RSA, ALG_SK, HANDSHAKE_TYPE, CODECS, DecodeError, WireFloat, b64decode, b64encode,
  decodeJson, decodeMsgpack, encodeJson, encodeMsgpack,
} from './index.js';

export interface RsaPublicKey { readonly key: CryptoKey; readonly der: Uint8Array; readonly bits: number; readonly kid: string }

export interface SealedRequest {
  /** The envelope as its encoding carries it (binary as Uint8Array or base64). */
  env: Record<string, unknown>;
  mid: string;
  ts: number;
  alg: Alg;
  sid: string;
  type: string;
  codec: Codec;
  replyKey: Uint8Array;
}

export interface DecodedReply {
  field: Encoding;
  sid: string;
  mid: string;
  status: 'ok' | 'error' | 'rejected';
  alg: Alg | null;
  code?: string;
  iv?: Uint8Array;
  ct?: Uint8Array;
  tag?: Uint8Array;
}

export interface OpenedReply {
  mid: string;
  type: string;
  status: 'ok' | 'error' | 'rejected';
  value?: unknown;
  code?: string;
  message?: string;
  authenticated: boolean;
}

export declare class OpenError extends Error {}

export declare function sealRequest(args: {
  alg: Alg; sid: string; type: string; payload: unknown; codec: Codec;
  rsa?: RsaPublicKey; ks?: Uint8Array; key?: Uint8Array; kid?: string; mid?: string; ts?: number;
}): Promise<SealedRequest>;
export declare function encodeEnvelope(sealed: SealedRequest): Uint8Array;
export declare function decodeReplyEntry(fields: Array<[string, Uint8Array]>): DecodedReply;
export declare function openReply(sealed: SealedRequest, reply: DecodedReply): Promise<OpenedReply>;

export declare function requestAad(alg: string, sid: string, mid: string, ts: number, type: string): string;
export declare function replyAad(alg: string, sid: string, mid: string, status: string): string;
export declare function hkdf32(ikm: Uint8Array, info: string): Promise<Uint8Array>;
export declare function skRequestKey(ks: Uint8Array, mid: string): Promise<Uint8Array>;
export declare function skReplyKey(ks: Uint8Array, mid: string): Promise<Uint8Array>;
export declare function importRsaPublicKey(pem: string, what?: string): Promise<RsaPublicKey>;
export declare function kidOf(spkiDer: Uint8Array): Promise<string>;
export declare function x25519KeyPair(): Promise<{ privateKey: CryptoKey; raw: Uint8Array }>;
export declare function deriveSessionKey(kb: Uint8Array, ecPrivate: CryptoKey, ecRaw: Uint8Array, ewRaw: Uint8Array, sid: string): Promise<Uint8Array>;
