"""The unit's HTTPS admin server: its pages, the HTTP redirect, hot certificate reload.

:func:`run_server` is the whole public surface; ``unitcert device serve`` calls
it once the identity exists. The modules underneath:

- :mod:`unitcert.web.tls`: the listening TLS context and the certificate swap.
- :mod:`unitcert.web.admin`: login, forced first password, status, logout.
- :mod:`unitcert.web.sessions`: sessions, CSRF tokens, the login rate limit.
- :mod:`unitcert.web.pages`: the HTML.
- :mod:`unitcert.web.redirect`: plain HTTP to HTTPS, with room for ACME HTTP-01.
- :mod:`unitcert.web.server`: sockets, signals and the background tasks.
"""

from __future__ import annotations

from unitcert.web.server import run_server

__all__ = ["run_server"]
