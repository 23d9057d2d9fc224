"""What keeps the pages and their APIs to the people meant to use them.

- ``check_bind``: loopback by default; any other ``--host`` needs an API key (the pages run the model and
  may see a camera: an open port on a shared network is not a default).
- ``WebSecurity`` (ASGI middleware): a ``Authorization: Bearer KEY`` check on the API paths when a key is
  set (the page itself loads without it, then asks for the key); without a key, only loopback ``Host``
  headers (a DNS-rebinding page cannot reach a loopback server); a cross-origin ``Origin`` on a POST is
  refused (no CSRF from other sites); and on every response a Content-Security-Policy that allows only this
  server's own scripts, styles and connections (no third-party or inline script).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from urllib.parse import urlsplit

from nvila_edge.errors import ConfigError

# media-src blob: / mediastream: — the page's camera preview and captured frames; img-src data: — attached pictures
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "media-src 'self' blob: mediastream:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
           (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]
LOOPBACK_NAMES = ("localhost", "localhost.localdomain")


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without a key (``ConfigError`` says what to do)."""
    if not is_loopback(host) and not api_key:
        raise ConfigError(f"--host {host} makes the server reachable from other machines: set --api-key KEY "
                          "(or NVILA_EDGE_API_KEY) so only clients with the key can use it, or keep the "
                          "default --host 127.0.0.1")


def _host_of(value: str) -> str:
    # "127.0.0.1:8000" / "[::1]:8000" / "localhost" → the name without the port
    return urlsplit("//" + value).hostname or ""


class WebSecurity:
    """ASGI middleware; ``protect``: path prefixes that need the key (when one is set)."""

    def __init__(self, app, api_key: str | None = None, protect: tuple[str, ...] = ("/v1/", "/api/")):
        self.app, self.api_key, self.protect = app, api_key or None, protect

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = self._refusal(scope)
        if refused is not None:
            return await self._error(send, *refused)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *(h for h in HEADERS if h[0] not in names)]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = _host_of(headers.get("host", ""))
        if self.api_key is None and not is_loopback(host):
            return 403, f"this server answers on loopback only, not for Host {host!r}", "host_refused", {}
        origin = headers.get("origin")
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and origin and origin != "null" \
                and urlsplit(origin).netloc != headers.get("host", ""):
            return 403, f"cross-origin request from {origin!r} refused", "origin_refused", {}
        if self.api_key and scope["path"].startswith(self.protect):
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                what = "a wrong API key" if auth else "no API key"
                return (401, f"{what}: send 'Authorization: Bearer KEY' with the key the server was started with "
                        "(--api-key)", "invalid_api_key", {"www-authenticate": "Bearer"})
        return None

    @staticmethod
    async def _error(send, status, message, code, extra):
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": code}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   *HEADERS, *((k.encode(), v.encode()) for k, v in extra.items())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
