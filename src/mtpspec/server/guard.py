"""Keeping web pages out: a page the user visits must not drive a server that has no key.

Browsers send any page's requests to any address, including 127.0.0.1; what they withhold is the
answer. Two rules keep such requests from running:
- **Origin.** A browser names the page behind a request in `Origin`. A request whose origin is not
  the server's own (same host and port) is refused unless `--allow-origin` lists it; listed origins
  also get CORS headers, so that their pages can read the answers.
- **Host.** DNS rebinding points a name the page owns at 127.0.0.1, which makes its requests
  same-origin. Such a request still carries the page's name in `Host`, so a server bound to loopback
  accepts only IP literals, `localhost` (and `*.localhost`), this machine's name and `--allow-host`
  names there. A name cannot be rebound to an IP literal, so those are safe.
The third, that a POST body must be declared `application/json` (a page can send `text/plain` or a
form without asking the server first), is checked where bodies are read.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from urllib.parse import urlsplit

from .errors import error_body


def host_names(allowed: tuple[str, ...]) -> frozenset[str]:
    """The names a loopback server answers to besides IP literals and localhost: `allowed` and this machine's."""
    return frozenset(n.lower().rstrip(".") for n in (socket.gethostname(), *allowed) if n)


class OriginGuard:
    """ASGI middleware refusing cross-origin requests and, when `hosts` is not None, foreign Host names."""

    def __init__(self, app, origins: tuple[str, ...], hosts: frozenset[str] | None):
        self.app = app
        self.origins = frozenset(o.rstrip("/").lower() for o in origins)
        self.hosts = hosts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host, origin = headers.get("host", ""), headers.get("origin")
        if self.hosts is not None and host and not self._known_host(host):
            message = (
                f"Host {host!r} is not a name of this server; it listens on loopback, so only local names are "
                "accepted (a proxy that forwards another name: mtpspec serve --allow-host NAME)"
            )
            return await _refuse(send, message, "host_not_allowed")
        if origin is not None and not self._allowed_origin(origin, host):
            message = (
                f"requests from web pages at {origin!r} are not allowed (mtpspec serve --allow-origin {origin} "
                "allows them)"
            )
            return await _refuse(send, message, "origin_not_allowed")
        await self.app(scope, receive, send)

    def _known_host(self, host: str) -> bool:
        name = _hostname(host)
        if name is None:
            return False
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name == "localhost" or name.endswith(".localhost") or name in self.hosts

    def _allowed_origin(self, origin: str, host: str) -> bool:
        origin = origin.rstrip("/").lower()
        if "*" in self.origins or origin in self.origins:
            return True
        return bool(host) and urlsplit(origin).netloc == host.lower()  # the server's own pages (/docs)


def _hostname(host: str) -> str | None:
    """The name in a Host header (`name`, `name:port`, `[v6]:port`), lower case; None if malformed."""
    try:
        name = urlsplit(f"//{host}").hostname
    except ValueError:
        return None
    return name.rstrip(".") if name else None


async def _refuse(send, message: str, code: str) -> None:
    body = json.dumps(error_body(message, type="permission_error", code=code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 403,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
