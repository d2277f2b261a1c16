// sealstream-client: the JavaScript client of the sealstream wire protocol v1,
// for Node >= 20 and current browsers (WebCrypto). This entry point has no Node
// dependency; the Redis transport is in 'sealstream-client/redis'.

export { Client, Session, Result, consoleLogger } from './client.js';
export { GatewayTransport } from './gateway.js';
export {
  SealstreamError, ConfigError, ProtocolError, ClientError, RequestRejected, RemoteError, ReplyTimeout,
  GatewayRefused,
} from './errors.js';
export { ALG_RSA, ALG_SK, HANDSHAKE_TYPE } from './crypto.js';
export {
  CODECS, DecodeError, WireFloat, decodeJson, decodeMsgpack, encodeJson, encodeMsgpack, b64decode, b64encode,
} from './codec.js';
