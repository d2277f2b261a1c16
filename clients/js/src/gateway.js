export class GatewayTransport {}
