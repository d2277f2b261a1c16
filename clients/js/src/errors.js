// The client's one error tree, as the Python client's (worker/errors.py):
//
//   SealstreamError
//   ├── ConfigError        bad options, an unpinned or mismatched service key
//   ├── ProtocolError      a reply or config that is not the protocol's
//   └── ClientError        a request that did not end in an `ok` reply
//       ├── RequestRejected  a `rejected` notice (unauthenticated: a hint)
//       ├── RemoteError      an authenticated `error` reply (code, message)
//       ├── ReplyTimeout     no reply within the timeout
//       └── GatewayRefused   the gateway refused a request (HTTP 4xx: status, code, detail)
//
// Messages never carry keys or plaintext.

export class SealstreamError extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = new.target.name;
  }
}

export class ConfigError extends SealstreamError {}

export class ProtocolError extends SealstreamError {}

export class ClientError extends SealstreamError {
  constructor(message, { messageId = null } = {}) {
    super(message);
    this.messageId = messageId;
  }
}

export class RequestRejected extends ClientError {
  constructor(code, { messageId = null } = {}) {
    super(`request rejected: ${code}`, { messageId });
    this.code = code;
  }
}

export class RemoteError extends ClientError {
  constructor(code, remoteMessage, { messageId = null } = {}) {
    super(`${code}: ${remoteMessage}`, { messageId });
    this.code = code;
    this.remoteMessage = remoteMessage;
  }
}

export class ReplyTimeout extends ClientError {}

export class GatewayRefused extends ClientError {
  constructor(status, code, detail, { messageId = null } = {}) {
    super(`the gateway refused the request (${status} ${code}): ${detail}`, { messageId });
    this.status = status;
    this.code = code;
    this.detail = detail;
  }
}
