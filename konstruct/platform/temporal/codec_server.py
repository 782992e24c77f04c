"""The codec server: the Web UI's and the CLI's way to read encrypted payloads.

Temporal's remote-codec protocol: `POST /decode` and `POST /encode` with a
JSON body `{"payloads": [...]}` (the proto3 JSON of `temporal.api.common.v1.
Payloads`) answer the same shape, decoded or encoded with `EncryptionCodec`.
The Web UI calls it from the browser, so it answers CORS preflights for the
UI's origin; with a bearer token set, every call must carry it
(`Authorization: Bearer <token>`). It holds the keys, so it listens on
loopback unless told otherwise.

    konstruct codec-server --port 8234 --ui-origin http://localhost:8233
    temporal workflow show -w <id> --codec-endpoint http://127.0.0.1:8234
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from google.protobuf import json_format
from temporalio.api.common.v1 import Payloads

from konstruct.platform.temporal.codec import CodecError, EncryptionCodec

log = logging.getLogger("konstruct.platform.temporal.codec_server")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def codec_app(codec: EncryptionCodec, origins: list[str], token: str | None) -> web.Application:
    """The aiohttp app: `/encode`, `/decode`, `/health`; CORS for `origins`."""

    def cors(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin and origin in origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers["Access-Control-Allow-Methods"] = "POST, GET, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = (
                "Content-Type, X-Namespace, Authorization"
            )
            response.headers["Vary"] = "Origin"
        return response

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS":
            return cors(request, web.Response(status=204))
        if token is not None and request.path != "/health":
            sent = request.headers.get("Authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                return cors(request, _error(401, "a bearer token is required"))
        return cors(request, await handler(request))

    async def transcode(request: web.Request, decode: bool) -> web.Response:
        try:
            body = await request.text()
            payloads = json_format.Parse(body, Payloads())
        except (json_format.ParseError, UnicodeDecodeError) as exc:
            return _error(400, f"the body must be {{'payloads': [...]}} as proto3 JSON: {exc}")
        try:
            done = await (codec.decode if decode else codec.encode)(list(payloads.payloads))
        except CodecError as exc:
            return _error(422, str(exc))
        out = json_format.MessageToJson(Payloads(payloads=done))
        return web.Response(text=out, content_type="application/json")

    async def decode(request: web.Request) -> web.Response:
        return await transcode(request, decode=True)

    async def encode(request: web.Request) -> web.Response:
        return await transcode(request, decode=False)

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text=json.dumps({"ok": True}), content_type="application/json")

    app = web.Application(middlewares=[guard])
    app.router.add_post("/decode", decode)
    app.router.add_post("/encode", encode)
    app.router.add_get("/health", health)
    return app


def serve(
    codec: EncryptionCodec, host: str, port: int, origins: list[str], token: str | None
) -> None:
    print(f"codec server on http://{host}:{port} (CORS for {', '.join(origins)})", flush=True)
    web.run_app(codec_app(codec, origins, token), host=host, port=port, print=None)
