"""ASGI middleware that guards the HTTP door: Host (without a token), Origin, CORS, bearer
token, method and Content-Type, checked in this order.

It decides from the request headers and the application's routes alone, never reads the
request body and never echoes the token. Its refusals are JSON in the nnunet_serve-compatible
shape: {"status": "failed", "error": ...}.
"""

import hmac
from collections.abc import Iterable, Iterator, Sequence

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .error_body import error_response

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
JSON = "application/json"
MULTIPART = "multipart/form-data"
PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST, DELETE",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Max-Age": "600",
}
TOKEN_ERROR = "missing or invalid bearer token (Authorization: Bearer <token>)"
#: The health probes: they answer any Host (Kubernetes probes send the pod's IP).
PROBE_PATHS = ("/readyz", "/livez", "/healthz")
#: The health probes and metrics: they answer without a token.
OPEN_PATHS = (*PROBE_PATHS, "/metrics")
#: The Host names that a server without a token answers whatever its settings.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
#: The route label of a path that no route serves.
UNKNOWN_ROUTE = "unknown"


def bearer_token_matches(header: str | None, token: str) -> bool:
    """True when an Authorization header is `Bearer <token>` (constant-time comparison)."""
    if not header or not token:
        return False
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


def _media_type(content_type: str | None) -> str:
    """The media type of a Content-Type header: lower-case, without parameters."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def host_name(host: str) -> str:
    """The name of a Host header value: lower-case, without its port and a final dot."""
    host = host.strip().lower()
    if host.startswith("["):
        address, bracket, _ = host.partition("]")
        return address + bracket
    name, _, port = host.rpartition(":")
    return (name if name and port.isdigit() else host).rstrip(".")


def matching_routes(
    routes: Iterable[BaseRoute], scope: Scope, prefix: str = ""
) -> Iterator[tuple[str, BaseRoute, Match]]:
    """The routes whose path matches the scope's, looked for inside mounted apps, each with
    its path template (as "/jobs/{job_id}") and whether its method matches too (Match.FULL).
    A mounted app without routes is one route."""
    for route in routes:
        match, child_scope = route.matches(scope)
        if match is Match.NONE:
            continue
        if isinstance(route, Mount) and route.routes:
            yield from matching_routes(route.routes, {**scope, **child_scope}, prefix + route.path)
        else:
            yield prefix + getattr(route, "path_format", getattr(route, "path", "")), route, match


def allowed_methods(routes: Iterable[BaseRoute], scope: Scope) -> set[str] | None:
    """The methods that the routes serve at the scope's path: empty when no route has the path,
    None when a route or mounted application there may take any method."""
    methods: set[str] = set()
    for _, route, _ in matching_routes(routes, scope):
        if not isinstance(route, Route) or route.methods is None:
            return None
        methods |= route.methods
    return methods


def route_template(routes: Iterable[BaseRoute], scope: Scope) -> str:
    """The path template of the route that serves the scope (the one whose method matches
    first), or UNKNOWN_ROUTE: a label that holds no id, UID or file name of the request."""
    matches = sorted(matching_routes(routes, scope), key=lambda found: found[2] is not Match.FULL)
    return matches[0][0] if matches else UNKNOWN_ROUTE


def _method_refusal(scope: Scope) -> Response | None:
    """A 405 with Allow when the application (scope["app"], set by Starlette) serves the path
    but not with this method, else None."""
    allowed = allowed_methods(getattr(scope.get("app"), "routes", ()), scope)
    if not allowed or scope["method"] in allowed:
        return None
    allow = ", ".join(sorted(allowed))
    message = f"method {scope['method']} is not allowed here; use {allow}"
    return error_response(405, message, {"Allow": allow})


def _with_cors(send: Send, origin: str) -> Send:
    """Wrap send so that every response start allows origin and varies on Origin."""

    async def send_with_cors(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            headers["Access-Control-Allow-Origin"] = origin
            headers.add_vary_header("Origin")
        await send(message)

    return send_with_cors


class RequestGuard:
    """Refuses foreign Hosts (without a token), foreign origins, missing bearer tokens,
    undeclared methods and unexpected Content-Types; adds CORS."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str | None,
        allowed_origins: Sequence[str] = (),
        allowed_hosts: Sequence[str] = (),
        open_paths: Sequence[str] = OPEN_PATHS,
        multipart_paths: Sequence[str] = (),
    ) -> None:
        if token == "":
            raise ValueError("token must not be empty; pass None to turn the token check off")
        self.app = app
        self.token = token
        self.allowed_origins = frozenset(origin.rstrip("/") for origin in allowed_origins)
        self.allowed_hosts = frozenset(map(host_name, (*LOOPBACK_HOSTS, *allowed_hosts)))
        self.open_paths = frozenset(open_paths)
        self.multipart_paths = frozenset(multipart_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self._host_refusal(scope, headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        origin = headers.get("origin")
        if origin is not None and not self._origin_accepted(scope, headers, origin):
            error = f"origin {origin} is not allowed; set NNUNET_BENTO_ALLOWED_ORIGINS to allow it"
            await error_response(403, error)(scope, receive, send)
            return
        if origin is not None and origin.rstrip("/") in self.allowed_origins:
            send = _with_cors(send, origin)
            if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                await Response(status_code=204, headers=PREFLIGHT_HEADERS)(scope, receive, send)
                return
        refusal = (
            self._token_refusal(scope, headers)
            or _method_refusal(scope)
            or self._content_type_refusal(scope, headers)
        )
        await (refusal or self.app)(scope, receive, send)

    def _host_refusal(self, scope: Scope, headers: Headers) -> Response | None:
        """A 421 when no token is configured and the Host is neither loopback nor allowed
        (a web page that rebinds its own name to this address), except on the probes."""
        if self.token is not None or scope["path"] in PROBE_PATHS:
            return None
        host = headers.get("host")
        if host is not None and host_name(host) in self.allowed_hosts:
            return None
        what = f"Host {host_name(host)}" if host else "a request without a Host header"
        return error_response(
            421,
            f"{what} is not served by a server without NNUNET_BENTO_API_TOKEN, which answers "
            "only localhost, 127.0.0.1, [::1] and the names in NNUNET_BENTO_ALLOWED_HOSTS; "
            "add the name to NNUNET_BENTO_ALLOWED_HOSTS, or set NNUNET_BENTO_API_TOKEN",
        )

    def _origin_accepted(self, scope: Scope, headers: Headers, origin: str) -> bool:
        """True for the server's own origin (scheme + Host) or a configured allowed origin."""
        origin = origin.rstrip("/")
        own = f"{scope['scheme']}://{headers.get('host', '')}"
        return origin == own or origin in self.allowed_origins

    def _token_refusal(self, scope: Scope, headers: Headers) -> Response | None:
        """A 401 when a token is configured and this non-open path lacks it, else None."""
        if self.token is None or scope["path"] in self.open_paths:
            return None
        if bearer_token_matches(headers.get("authorization"), self.token):
            return None
        return error_response(401, TOKEN_ERROR, {"WWW-Authenticate": "Bearer"})

    def _content_type_refusal(self, scope: Scope, headers: Headers) -> Response | None:
        """A 415 when a body-carrying request's media type is not accepted here, else None."""
        if scope["method"] not in BODY_METHODS:
            return None
        accepted = (JSON, MULTIPART) if scope["path"] in self.multipart_paths else (JSON,)
        sent = _media_type(headers.get("content-type"))
        if sent in accepted:
            return None
        what = f"Content-Type {sent} is not accepted" if sent else "Content-Type is missing"
        return error_response(415, f"{what}; send {' or '.join(accepted)}")
