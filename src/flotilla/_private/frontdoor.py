"""The HTTP front door (proxy and direct ingress): TLS, API keys, user middlewares.

- TLS: `http_options` `ssl_certfile`, `ssl_keyfile`, `ssl_keyfile_password`, `ssl_ca_certs`
  (uvicorn's names). `ssl_context` loads them (the head does it once before it binds, so a bad
  file fails `serve.start` naming it); `ssl_ca_certs` makes client certificates required.
- API keys: `http_options["api_keys"]` or `FLOTILLA_API_KEYS` (comma-separated), read by the
  driver (`driver_options`), which replaces them by their SHA-256 digests: the keys themselves
  never reach the head, its checkpoint, the proxy or a log. `KeyGuard` is the outermost ASGI
  app: a request without `Authorization: Bearer <key>` gets 401 before any routing or body
  read (WebSocket: an HTTP 401 denial where the server offers it, else close 1008);
  `/-/healthz` stays open. Refusals count in `flotilla_auth_failures_total{side="http"}`.
- Middlewares: `http_options["middlewares"]`, Starlette `Middleware` objects, travel as
  cloudpickle bytes (`middlewares_pickle`, base64) that only the proxy (or a direct-ingress
  replica) unpickles.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import os
import ssl
import sys
from typing import Any

from flotilla._private import http_util

logger = logging.getLogger("flotilla.frontdoor")

TLS_FILES = ("ssl_certfile", "ssl_keyfile", "ssl_ca_certs")
KEYS_ENV = "FLOTILLA_API_KEYS"
DIGESTS = "api_key_sha256"  # the options' key holding the API keys' digests (hex)
MIDDLEWARES = "middlewares_pickle"
MIDDLEWARES_PATH = "middlewares_sys_path"  # the driver's import path, to unpickle them
SECRET = ("api_keys", "ssl_keyfile_password", DIGESTS, MIDDLEWARES)
AUTH_METRIC = "flotilla_auth_failures_total"
_CHALLENGE = [(b"www-authenticate", b"Bearer")]
LOOPBACK = ("localhost",)


def check_file(path: str | None) -> str | None:
    """`path` (absolute) if it is a readable file, else ValueError naming it."""
    if path is None:
        return None
    if not os.path.isfile(path):
        raise ValueError(f"file {path!r} does not exist")
    if not os.access(path, os.R_OK):
        raise ValueError(f"file {path!r} is not readable")
    return os.path.abspath(path)


def check_middlewares(value: list[Any]) -> list[Any]:
    """Only `starlette.middleware.Middleware` objects."""
    from starlette.middleware import Middleware

    for i, m in enumerate(value):
        if not isinstance(m, Middleware):
            raise ValueError(
                f"entry {i} is {type(m).__name__}, not a starlette.middleware.Middleware; wrap it, "
                "e.g. Middleware(CORSMiddleware, allow_origins=['*'])")
    return value


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def digest(key: str | bytes) -> str:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()


def driver_options(options: dict[str, Any]) -> dict[str, Any]:
    """What `serve.start` sends to the head, from `HTTPOptions.model_dump()`: API keys (or
    `FLOTILLA_API_KEYS`) as digests, middlewares pickled; warns once about an open front door."""
    options = dict(options)
    keys = options.pop("api_keys", None)
    if keys is None and os.environ.get(KEYS_ENV, "").strip():
        keys = [k.strip() for k in os.environ[KEYS_ENV].split(",") if k.strip()]
    if keys:
        options[DIGESTS] = sorted({digest(k) for k in keys})
    mws = options.pop("middlewares", None)
    if mws:
        import cloudpickle

        options[MIDDLEWARES] = base64.b64encode(cloudpickle.dumps(list(mws))).decode()  # control calls are JSON
        options[MIDDLEWARES_PATH] = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
    if not options.get("proxy_disabled"):
        warn_if_open(options)
    return options


_warned: set[str] = set()


def warn_if_open(options: dict[str, Any]) -> None:
    """One warning when the front door listens beyond loopback with neither TLS nor API keys."""
    host = str(options.get("host") or "127.0.0.1")
    if options.get("location") in ("Disabled", "NoServer") or is_loopback(host) or host in _warned:
        return
    if tls_enabled(options) or options.get(DIGESTS):
        return
    _warned.add(host)
    logger.warning(
        "the HTTP proxy listens on %s: it is reachable from the network unencrypted and "
        "unauthenticated. Set http_options 'ssl_certfile'/'ssl_keyfile' (TLS) and 'api_keys' "
        "(or %s), or bind host='127.0.0.1'.", host, KEYS_ENV)


def redact(options: dict[str, Any] | None) -> dict[str, Any] | None:
    """`options` fit for a log line: secrets and pickles replaced by '<redacted>'."""
    if options is None:
        return None
    return {k: ("<redacted>" if k in SECRET and v else v) for k, v in options.items()}


def tls_enabled(options: dict[str, Any]) -> bool:
    return bool(options.get("ssl_certfile"))


def scheme(options: dict[str, Any]) -> str:
    return "https" if tls_enabled(options) else "http"


def ssl_context(options: dict[str, Any]) -> ssl.SSLContext | None:
    """The server's TLS context, or None without `ssl_certfile`. Raises RuntimeError naming
    the file that could not be loaded (missing, unreadable, bad, wrong password)."""
    certfile = options.get("ssl_certfile")
    if not certfile:
        if options.get("ssl_keyfile") or options.get("ssl_ca_certs"):
            raise RuntimeError("http_options: ssl_keyfile and ssl_ca_certs need ssl_certfile")
        return None
    keyfile = options.get("ssl_keyfile")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(certfile, keyfile, options.get("ssl_keyfile_password"))
    except (OSError, ssl.SSLError) as e:
        files = f"ssl_certfile {certfile!r}" + (f" / ssl_keyfile {keyfile!r}" if keyfile else "")
        raise RuntimeError(f"TLS: could not load the certificate chain from {files}: {_why(e)}") from None
    ca = options.get("ssl_ca_certs")
    if ca:
        try:
            ctx.load_verify_locations(ca)
        except (OSError, ssl.SSLError) as e:
            raise RuntimeError(f"TLS: could not load ssl_ca_certs {ca!r}: {_why(e)}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _why(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        return (f"{e.reason or e} (not PEM, a key that does not match the certificate, or a wrong "
                "ssl_keyfile_password)")
    return str(getattr(e, "strerror", None) or e).lower()


def uvicorn_ssl(options: dict[str, Any]) -> dict[str, Any]:
    """uvicorn.Config keyword arguments for TLS (checked first: a bad file raises RuntimeError)."""
    if ssl_context(options) is None:
        return {}
    out: dict[str, Any] = {"ssl_certfile": options["ssl_certfile"], "ssl_keyfile": options.get("ssl_keyfile"),
                           "ssl_keyfile_password": options.get("ssl_keyfile_password")}
    if options.get("ssl_ca_certs"):
        out.update(ssl_ca_certs=options["ssl_ca_certs"], ssl_cert_reqs=ssl.CERT_REQUIRED)
    return out


def wrap(app: Any, options: dict[str, Any], component: str) -> Any:
    """`app` behind the user's middlewares (first = outermost) and, outermost, the API keys.

    With both, a CORS preflight (which browsers send without credentials) passes the outer
    key check so that a CORS middleware can answer it; a second check in front of `app` turns
    away whatever the middlewares let through without a key."""
    blob = options.get(MIDDLEWARES)
    digests = options.get(DIGESTS)
    root_path = options.get("root_path") or ""
    if blob and digests:
        app = KeyGuard(app, digests, root_path, component)
    if blob:
        import cloudpickle

        for p in options.get(MIDDLEWARES_PATH) or ():  # classes pickled by reference import from there
            if p not in sys.path and os.path.isdir(p):
                sys.path.append(p)
        for m in reversed(cloudpickle.loads(base64.b64decode(blob))):
            app = m.cls(app, *m.args, **m.kwargs)
    if digests:
        app = KeyGuard(app, digests, root_path, component, preflight=bool(blob))
    return app


def _is_preflight(scope: dict[str, Any]) -> bool:
    if scope["method"] != "OPTIONS":
        return False
    names = {k for k, _ in scope["headers"]}
    return b"origin" in names and b"access-control-request-method" in names


class KeyGuard:
    """ASGI: `Authorization: Bearer <key>` required on every HTTP and WebSocket request but
    `/-/healthz`; checked against every key's digest in constant time."""

    def __init__(self, app: Any, digests: list[str], root_path: str, component: str,
                 preflight: bool = False) -> None:
        self.app = app
        self.preflight = preflight  # let CORS preflights through (to the user's middlewares)
        self.digests = [bytes.fromhex(d) for d in digests]
        self.root_path = root_path
        self.component = component
        self.declared = False

    def reason(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """None when a key matches, else "missing" or "invalid"."""
        value = None
        for k, v in headers:
            if k == b"authorization":
                value = v
                break
        if value is None:
            return "missing"
        kind, _, token = value.strip().partition(b" ")
        if kind.lower() != b"bearer" or not token.strip():
            return "invalid"
        got = hashlib.sha256(token.strip()).digest()
        ok = False
        for d in self.digests:  # every key, no early exit
            ok |= hmac.compare_digest(got, d)
        return None if ok else "invalid"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        why = self.reason(scope["headers"])
        if why is None or (kind == "http" and (
                http_util.mount(self.root_path, scope["path"])[0] == "/-/healthz"
                or (self.preflight and _is_preflight(scope)))):
            await self.app(scope, receive, send)
            return
        self.count(why)
        body = b"Unauthorized: send 'Authorization: Bearer <API key>'.\n"
        headers = [*_CHALLENGE, (b"content-type", b"text/plain; charset=utf-8"),
                   (b"content-length", str(len(body)).encode())]
        if kind == "http":
            await http_util.reply(send, 401, headers, body)
        elif "websocket.http.response" in (scope.get("extensions") or {}):
            await send({"type": "websocket.http.response.start", "status": 401, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008})

    def count(self, reason: str) -> None:
        from flotilla._private.metrics import AUTH_FAILURES_DOC, STORE

        if not self.declared:
            STORE.declare("counter", AUTH_METRIC, AUTH_FAILURES_DOC, ("component", "side", "reason"))
            self.declared = True
        STORE.inc(AUTH_METRIC, (self.component, "http", reason))


async def proxy_tls(options: dict[str, Any], link: Any) -> dict[str, Any]:
    """`uvicorn_ssl` in the proxy; a file that fails to load is reported to the head
    (`proxy_failed`, when `link` is given: serve.start raises it) before this raises."""
    try:
        return uvicorn_ssl(options)
    except RuntimeError as e:
        logger.error("%s", e)
        if link is not None:
            await link.call("proxy_failed", str(e), os.getpid())
        raise


METRICS_HOST_ENV = "FLOTILLA_METRICS_HOST"
METRICS_TOKEN_ENV = "FLOTILLA_METRICS_TOKEN"


def metrics_access(session_dir: str) -> tuple[str, bytes | None]:
    """The head's /metrics host ($FLOTILLA_METRICS_HOST, default 127.0.0.1) and, beyond
    loopback, the bearer token scrapes need: $FLOTILLA_METRICS_TOKEN, else one generated (or
    kept from a previous head of this session) in `<session_dir>/metrics_token` (mode 0600)."""
    host = os.environ.get(METRICS_HOST_ENV, "").strip() or "127.0.0.1"
    if is_loopback(host):
        return host, None
    token = os.environ.get(METRICS_TOKEN_ENV, "").strip()
    path = os.path.join(session_dir, "metrics_token")
    where = f"${METRICS_TOKEN_ENV}"
    if not token:
        try:
            with open(path) as f:
                token = f.read().strip()
        except OSError:
            token = ""
        if not token:
            import secrets

            token = secrets.token_urlsafe(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token)
        where = path
    logger.info("metrics endpoint on %s: scrapes need 'Authorization: Bearer <token>' (the token: %s)", host, where)
    return host, token.encode()


def bearer_ok(head: bytes, token: bytes) -> bool:
    """Whether a raw HTTP request head carries `Authorization: Bearer <token>` (constant time)."""
    got = b""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"authorization":
            kind, _, got = value.strip().partition(b" ")
            if kind.lower() != b"bearer":
                got = b""
            break
    return hmac.compare_digest(hashlib.sha256(got.strip()).digest(), hashlib.sha256(token).digest())
