"""The dashboard's guards: who may ask (token off loopback), which files (workspace areas only),
and which writes (same origin, with the session's CSRF token).

Threats: another site in the user's browser posting to localhost (CSRF, DNS rebinding), a
path that climbs out of the served folders (``..``, encoded or not, absolute, a symlink out),
and, with ``--host 0.0.0.0``, anyone on the network.
"""
from __future__ import annotations

import ipaddress
import secrets
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from starlette.responses import JSONResponse, PlainTextResponse

TOKEN_COOKIE = "lorabuild_token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


class Refused(Exception):
    """A request the guards refuse; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Guard:
    """Per server session: the token (None on loopback) and the CSRF token."""

    def __init__(self, host: str, token: str | None = None):
        self.loopback = is_loopback(host)
        self.token = None if self.loopback else (token or secrets.token_urlsafe(24))
        self.csrf = secrets.token_urlsafe(24)

    def check_access(self, scope_headers: dict, query: dict, cookies: dict) -> None:
        host = urlsplit("//" + scope_headers.get("host", "")).hostname or ""
        if self.loopback and not is_loopback(host):
            # DNS rebinding: evil.example resolving to 127.0.0.1 still sends its own name as Host
            raise Refused(403, f"this dashboard answers only to localhost, not to Host {host!r}")
        if self.token is None:
            return
        given = query.get("token") or scope_headers.get("x-lorabuild-token") or cookies.get(TOKEN_COOKIE) or ""
        if not secrets.compare_digest(given.encode(), self.token.encode()):
            raise Refused(401, "this dashboard is bound to a network address: open it with the ?token=… "
                               "link `lorabuild serve` printed at start")

    def check_write(self, method: str, headers: dict) -> None:
        if method in SAFE_METHODS:
            return
        if not secrets.compare_digest(headers.get("x-csrf-token", "").encode(), self.csrf.encode()):
            raise Refused(403, "a write needs this session's CSRF token (reload the page)")
        origin = headers.get("origin") or _origin_of(headers.get("referer", ""))
        if not origin or urlsplit(origin).netloc != headers.get("host", ""):
            raise Refused(403, f"a write must come from this dashboard's own page, not from origin {origin!r}")


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""


class GuardMiddleware:
    """ASGI middleware running :class:`Guard`'s checks before any route."""

    def __init__(self, app, guard: Guard):
        self.app, self.guard = app, guard

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.requests import Request

        req = Request(scope)
        headers = {k.lower(): v for k, v in req.headers.items()}
        try:
            self.guard.check_access(headers, dict(req.query_params), req.cookies)
            self.guard.check_write(req.method, headers)
        except Refused as exc:
            resp = JSONResponse({"error": str(exc)}, status_code=exc.status) if scope["path"].startswith("/api/") \
                else PlainTextResponse(str(exc), status_code=exc.status)
            return await resp(scope, receive, send)
        if self.guard.token and req.query_params.get("token") == self.guard.token:
            async def send_with_cookie(message):  # so images, SSE and fetches carry the token from here on
                if message["type"] == "http.response.start":
                    cookie = f"{TOKEN_COOKIE}={self.guard.token}; Path=/; HttpOnly; SameSite=Strict"
                    message.setdefault("headers", []).append((b"set-cookie", cookie.encode()))
                await send(message)
            return await self.app(scope, receive, send_with_cookie)
        return await self.app(scope, receive, send)


def safe_path(rel: str, roots: list[Path], base: Path) -> Path:
    """``rel`` (a URL path, already percent-decoded once) under ``base``, if it lands inside one
    of ``roots`` after every symlink is followed; else :class:`Refused`.

    Refused outright: absolute paths (POSIX, drive letters, UNC), backslashes, ``..`` and
    ``.`` segments, NUL, and a ``%`` left after decoding (a double-encoded ``%2e%2e``)."""
    if not rel or "\0" in rel or "\\" in rel or "%" in rel or ":" in rel or rel.startswith("/"):
        raise Refused(400, f"not a relative workspace path: {rel!r}")
    parts = PurePosixPath(rel).parts
    if any(p in ("..", ".") for p in rel.split("/")) or not parts:
        raise Refused(400, f"a path may not climb ('..'): {rel!r}")
    try:
        target = (base / Path(*parts)).resolve(strict=True)
    except (OSError, RuntimeError):
        raise Refused(404, f"no such file: {rel}") from None
    for root in roots:
        try:
            real_root = root.resolve(strict=True)
        except OSError:
            continue
        if target.is_relative_to(real_root) and target.is_file():
            return target
    raise Refused(403, f"{rel} is outside the folders the dashboard serves (output/, cache/, dataset folders)")
