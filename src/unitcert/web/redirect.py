"""The plain-HTTP side: every request is sent to the HTTPS admin pages.

Requests under ``/.well-known/acme-challenge/`` are answered first from
:data:`ACME_RESPONSES` (token to key authorization, RFC 8555 section 8.3),
which the ACME agent fills while an HTTP-01 challenge is open; unknown tokens
are redirected like every other path.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import MutableMapping
from urllib.parse import quote

from aiohttp import web

__all__ = [
    "ACME_CHALLENGE_PREFIX",
    "ACME_RESPONSES",
    "https_location",
    "redirect_app",
]

logger = logging.getLogger(__name__)

ACME_CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
ACME_RESPONSES: web.AppKey[MutableMapping[str, str]] = web.AppKey(
    "acme_responses", MutableMapping
)
_HTTPS_PORT: web.AppKey[int] = web.AppKey("https_port", int)
_BIND: web.AppKey[str] = web.AppKey("bind", str)

# A DNS name or IPv4 literal; anything else in a Host header is not echoed.
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")
# Characters kept as they are in the redirected path and query; the rest
# (spaces, quotes, angle brackets, control characters, non-ASCII) is
# percent-encoded, so nothing from the request can break the Location header.
_PATH_SAFE = "/?&=%+:@!$'()*,;~.-_"


def _url_host(host: str) -> str:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host
    return f"[{address}]" if address.version == 6 else str(address)


def _is_wildcard(bind: str) -> bool:
    if not bind:
        return True
    try:
        return ipaddress.ip_address(bind).is_unspecified
    except ValueError:
        return False


def _host_from_header(header: str | None) -> str | None:
    """Return the host of a Host header without its port, or None when unusable."""
    if not header:
        return None
    if header.startswith("["):
        end = header.find("]")
        try:
            address = ipaddress.IPv6Address(header[1:end])
        except ValueError:
            return None
        return f"[{address}]"
    host = header.rsplit(":", 1)[0] if header.count(":") == 1 else header
    if not _HOSTNAME_RE.match(host):
        return None
    return host


def https_location(
    host_header: str | None, path_qs: str, *, https_port: int, fallback_host: str
) -> str:
    """Return the HTTPS URL a plain-HTTP request is redirected to.

    Args:
        host_header: the request's Host header, if any.
        path_qs: the request's path and query, as sent.
        https_port: the admin server's port.
        fallback_host: the host to use when the Host header is missing or unusable.
    """
    host = _host_from_header(host_header) or _url_host(fallback_host)
    path = quote(path_qs, safe=_PATH_SAFE)
    if not path.startswith("/"):
        path = "/" + path
    return f"https://{host}:{https_port}{path}"


async def _handle(request: web.Request) -> web.StreamResponse:
    path = request.rel_url.raw_path
    if path.startswith(ACME_CHALLENGE_PREFIX) and request.method in ("GET", "HEAD"):
        token = path[len(ACME_CHALLENGE_PREFIX) :]
        answer = request.app[ACME_RESPONSES].get(token)
        if answer is not None:
            logger.info("answered an ACME HTTP-01 challenge")
            return web.Response(text=answer, content_type="application/octet-stream")

    fallback = request.app[_BIND]
    if _is_wildcard(fallback) and request.transport is not None:
        sockname = request.transport.get_extra_info("sockname")
        if sockname:
            fallback = sockname[0]
    location = https_location(
        request.headers.get("Host"),
        request.rel_url.raw_path_qs,
        https_port=request.app[_HTTPS_PORT],
        fallback_host=fallback,
    )
    return web.Response(
        status=301,
        headers={"Location": location, "Cache-Control": "no-store"},
        text=f"This unit's admin pages are at {location}\n",
    )


async def _name_server(_: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "unitcert"


def redirect_app(*, https_port: int, bind: str) -> web.Application:
    """Build the plain-HTTP application that redirects to ``https_port``.

    Args:
        https_port: the HTTPS admin server's port.
        bind: the address both servers listen on; the redirect's host when a
            request has no usable Host header.
    """
    app = web.Application(client_max_size=4096)
    app[ACME_RESPONSES] = {}
    app[_HTTPS_PORT] = https_port
    app[_BIND] = bind
    app.on_response_prepare.append(_name_server)
    app.router.add_route("*", r"/{tail:[\s\S]*}", _handle)
    return app
