"""The admin page for ACME: the settings, the status, and "retry now".

The page shows what ``unitcert device acme`` shows: the settings (never the
TSIG secret or the account key), the certificate and its expiry, the last
attempt and its outcome, and the next attempt. "Retry now" asks the agent
in ``serve`` to order at once; it is accepted once per
:data:`RETRY_INTERVAL`, and the agent's own limits (``Retry-After``, orders
per day, failed validations per hour) still apply to it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from html import escape
from typing import TYPE_CHECKING

from aiohttp import web
from multidict import MultiDict, MultiDictProxy

from unitcert.errors import UnitcertError
from unitcert.web import admin
from unitcert.web.pages import hidden_field, layout, message_html

if TYPE_CHECKING:
    from unitcert.acme.agent import AcmeStatus

__all__ = ["RETRY_INTERVAL", "acme_page", "add_acme_pages"]

logger = logging.getLogger(__name__)

RETRY_INTERVAL = dt.timedelta(minutes=10)
_NO_FORM: MultiDictProxy[str] = MultiDictProxy(MultiDict())


def format_date(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%d %B %Y, %H:%M UTC")


def _rows(rows: list[tuple[str, str]]) -> str:
    cells = "\n".join(
        f"<tr><th>{escape(name)}</th><td>{escape(value)}</td></tr>"
        for name, value in rows
    )
    return f"<table>\n{cells}\n</table>\n"


def _status_rows(status: AcmeStatus, now: dt.datetime) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    if status.cert is None:
        rows.append(("Certificate", "none yet"))
    else:
        left = (status.cert.not_after - now).days
        expiry = (
            f"expired on {format_date(status.cert.not_after)}"
            if status.cert.not_after < now
            else f"valid until {format_date(status.cert.not_after)} ({left} days left)"
        )
        served = "served now" if status.served else "not served"
        rows.append(
            ("Certificate", f"{', '.join(status.cert.names)}: {expiry}; {served}")
        )
    outcome = status.state.outcome
    if outcome is not None:
        result = "succeeded" if outcome.ok else "failed"
        rows.append(
            ("Last attempt", f"{format_date(outcome.at)}: {result}: {outcome.message}")
        )
    else:
        rows.append(("Last attempt", "none yet"))
    decision = status.decision
    if decision is None:
        rows.append(("Next attempt", "none: ACME is off"))
    elif decision.order:
        rows.append(("Next attempt", f"now ({decision.reason})"))
    else:
        rows.append(("Next attempt", decision.reason))
    return rows


def acme_page(
    status: AcmeStatus,
    csrf_token: str,
    *,
    notice: str | None = None,
    error: str | None = None,
    now: dt.datetime | None = None,
) -> str:
    """The ACME page: settings, status, and the "retry now" button."""
    now = now or dt.datetime.now(dt.UTC)
    settings = status.settings
    parts = ["<h1>Certificate from an ACME CA</h1>\n", message_html("notice", notice)]
    parts.append(message_html("error", error))
    if status.note:
        parts.append(
            message_html("warning", f"{status.note[0].upper()}{status.note[1:]}.")
        )
    if settings is None:
        parts.append(
            "<p>ACME is not set up on this unit. A unit with a public name or "
            "address can get a browser-trusted certificate: on the unit, run "
            "<code>unitcert device acme --directory URL --domain NAME</code>.</p>\n"
        )
    else:
        state = "on" if settings.enabled else "off (the unit serves its own identity)"
        parts.append("<h2>Settings</h2>\n")
        parts.append(_rows([("ACME", state), *settings.describe()]))
        parts.append("<h2>Status</h2>\n")
        parts.append(_rows(_status_rows(status, now)))
        if settings.enabled:
            parts.append(
                '<form method="post" action="/acme/retry">'
                f"{hidden_field(csrf_token)}"
                '<button type="submit">Retry now</button></form>\n'
                '<p class="hint">Asks the unit to order now. The CA\'s limits still '
                "apply, and the button works once every "
                f"{int(RETRY_INTERVAL.total_seconds() // 60)} minutes.</p>\n"
            )
    parts.append(
        '<nav>\n<a href="/">Certificate status</a>\n'
        '<form method="post" action="/logout">'
        f"{hidden_field(csrf_token)}"
        '<button type="submit">Log out</button></form>\n</nav>'
    )
    return layout("ACME certificate", "".join(parts))


class _AcmePages:
    """The handlers, sharing the admin pages' sessions."""

    def __init__(self, pages: admin.AdminPages) -> None:
        self.admin = pages

    def _status(self) -> AcmeStatus:
        # Imported on first use: the ACME libraries load only when the page is
        # opened, not before the unit's first handshake.
        from unitcert.acme.agent import load_status

        return load_status(self.admin.store)

    def _request(self, now: dt.datetime) -> None:
        from unitcert.acme.agent import request_order

        request_order(self.admin.store, now=now, button=True)

    def _gate(self, request: web.Request) -> tuple[web.Response | None, str]:
        session = self.admin.session_for(request)
        if session is None:
            return admin.see_other("/login"), ""
        if self.admin.owner_must_change():
            return admin.see_other("/password"), ""
        return None, session.csrf_token

    async def _page(
        self,
        csrf_token: str,
        *,
        notice: str | None = None,
        error: str | None = None,
        status: int = 200,
    ) -> web.Response:
        try:
            current = await asyncio.to_thread(self._status)
        except UnitcertError as exc:
            logger.error("cannot read the ACME status: %s", exc)
            return admin.error_response(500)
        text = acme_page(current, csrf_token, notice=notice, error=error)
        return admin.html_response(text, status=status)

    async def show(self, request: web.Request) -> web.StreamResponse:
        refused, csrf_token = self._gate(request)
        if refused is not None:
            return refused
        notice = None
        if "requested" in request.query:
            notice = (
                "The unit was asked to order now. Reload this page in a few seconds "
                "to see the outcome."
            )
        return await self._page(csrf_token, notice=notice)

    async def retry(self, request: web.Request) -> web.StreamResponse:
        refused, csrf_token = self._gate(request)
        if refused is not None:
            return refused
        if admin.is_cross_origin(request):
            forged = self.admin.refuse_forgery(request, csrf_token, _NO_FORM)
            return forged or admin.error_response(403)
        form = await request.post()
        forged = self.admin.refuse_forgery(request, csrf_token, form)
        if forged is not None:
            return forged

        now = dt.datetime.now(dt.UTC)
        current = await asyncio.to_thread(self._status)
        last = current.state.retry_button_at
        if last is not None and now - last < RETRY_INTERVAL:
            wait = RETRY_INTERVAL - (now - last)
            minutes = max(1, round(wait.total_seconds() / 60))
            response = await self._page(
                csrf_token,
                error=f'"Retry now" was used a moment ago: wait {minutes} minute'
                f"{'s' if minutes != 1 else ''} and try again.",
                status=429,
            )
            response.headers["Retry-After"] = str(int(wait.total_seconds()) + 1)
            return response
        try:
            await asyncio.to_thread(self._request, now)
        except UnitcertError as exc:
            return await self._page(csrf_token, error=str(exc), status=400)
        logger.info("the admin asked for an ACME order now from %s", request.remote)
        return admin.see_other("/acme?requested")


def add_acme_pages(app: web.Application, pages: admin.AdminPages) -> None:
    """Add the ACME page to the admin application."""
    handlers = _AcmePages(pages)
    app.router.add_get("/acme", handlers.show)
    app.router.add_post("/acme/retry", handlers.retry)
