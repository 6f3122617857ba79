"""The HTTPS admin pages: login, the forced first password, status, logout.

Every state-changing request is a POST that must carry the CSRF token of its
session (or, for the login form, the token bound to the login cookie) and
must not come from another origin. Failed logins are rate-limited per client
address and overall. No page ever shows a traceback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import urlsplit

from aiohttp import web

from unitcert import device
from unitcert.credential import AdminCredential
from unitcert.errors import InputError, UnitcertError
from unitcert.store import StateStore
from unitcert.web import pages
from unitcert.web.sessions import (
    LoginForms,
    LoginLimiter,
    Session,
    SessionStore,
    credential_tag,
    tokens_match,
)
from unitcert.web.tls import CertificateSwitch

__all__ = [
    "FORM_MAX_SIZE",
    "LOGIN_COOKIE",
    "SESSION_COOKIE",
    "admin_app",
]

logger = logging.getLogger(__name__)

SESSION_COOKIE = "unitcert_session"
LOGIN_COOKIE = "unitcert_login"
FORM_MAX_SIZE = 64 * 1024

_SECURITY_HEADERS = {
    # Replaces aiohttp's default, which names the Python and aiohttp versions.
    "Server": "unitcert",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
}

_ERROR_TEXTS = {
    400: ("Bad request", "The unit could not understand the request."),
    403: ("Not allowed", "You may not open this page."),
    404: ("Page not found", "There is no page at this address."),
    405: ("Method not allowed", "This page does not accept that kind of request."),
    413: ("Form too large", "The form sent was larger than the unit accepts."),
    500: (
        "Something went wrong",
        "The unit could not handle the request. The error was logged; try again.",
    ),
}
_CSRF_TEXT = (
    "This form has expired or was sent from another site: go back, reload the "
    "page and try again."
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def html_response(text: str, *, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html")


def error_response(
    status: int, title: str | None = None, message: str | None = None
) -> web.Response:
    default_title, default_message = _ERROR_TEXTS.get(
        status, ("Request failed", "The unit could not answer this request.")
    )
    return html_response(
        pages.error_page(status, title or default_title, message or default_message),
        status=status,
    )


def see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _set_cookie(response: web.StreamResponse, name: str, value: str) -> None:
    response.set_cookie(
        name, value, secure=True, httponly=True, samesite="Strict", path="/"
    )


def _del_cookie(response: web.StreamResponse, name: str) -> None:
    response.del_cookie(name, secure=True, httponly=True, samesite="Strict", path="/")


def form_field(form: Mapping[str, object], name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def _client(request: web.Request) -> str:
    return request.remote or "unknown"


def is_cross_origin(request: web.Request) -> bool:
    """Say whether a browser told us the request comes from another origin."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        # A browser that sends Sec-Fetch-Site says exactly where the request
        # came from; its Origin is "null" under our "Referrer-Policy:
        # no-referrer" (Fetch standard, "serializing a request origin").
        return site not in ("same-origin", "none")
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    parts = urlsplit(origin)
    host = request.headers.get("Host", "")
    return parts.scheme != "https" or parts.netloc.lower() != host.lower()


@web.middleware
async def _plain_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(exc.status)
        for name in ("Allow", "Retry-After"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except Exception as exc:
        # The type only: a message may quote a form field.
        logger.error("the admin page %s failed (%s)", request.path, type(exc).__name__)
        logger.debug("admin page failure", exc_info=True)
        return error_response(500)


async def _security_headers(_: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(_SECURITY_HEADERS)


class AdminPages:
    """The handlers, with the state they share."""

    def __init__(self, store: StateStore, switch: CertificateSwitch) -> None:
        self.store = store
        self.switch = switch
        self.sessions = SessionStore()
        self.login_forms = LoginForms()
        self.limiter = LoginLimiter()

    # --- sessions ---------------------------------------------------------

    def _credential(self) -> AdminCredential | None:
        return self.switch.unit.admin

    def session_for(self, request: web.Request) -> Session | None:
        return self.sessions.get(
            request.cookies.get(SESSION_COOKIE), credential_tag(self._credential())
        )

    def _start_session(self, response: web.StreamResponse) -> None:
        token = self.sessions.create(credential_tag(self._credential()))
        _set_cookie(response, SESSION_COOKIE, token)

    def owner_must_change(self) -> bool:
        credential = self._credential()
        return credential is not None and credential.must_change

    @staticmethod
    def refuse_forgery(
        request: web.Request, expected: str | None, form: Mapping[str, object]
    ) -> web.Response | None:
        """Return a 403 page unless the POST is same-origin with the right token."""
        if is_cross_origin(request):
            reason = "it came from another origin"
        elif expected is None:
            reason = "there is no session or login cookie"
        elif not tokens_match(form_field(form, "csrf_token"), expected):
            reason = "its form token is missing or wrong"
        else:
            return None
        logger.warning("refused %s %s: %s", request.method, request.path, reason)
        return error_response(403, "Request refused", _CSRF_TEXT)

    def _too_many(self, client: str) -> web.Response | None:
        wait = self.limiter.retry_after(client)
        if wait is None:
            return None
        minutes = max(1, round(wait / 60))
        response = error_response(
            429,
            "Too many failed logins",
            f"Too many wrong passwords were tried. Wait {minutes} minute"
            f"{'s' if minutes != 1 else ''} and try again.",
        )
        response.headers["Retry-After"] = str(wait)
        return response

    # --- pages ------------------------------------------------------------

    async def status(self, request: web.Request) -> web.StreamResponse:
        session = self.session_for(request)
        if session is None:
            # The start page of a unit is its login form (as `curl /` shows).
            return self._login_page(request)
        if self.owner_must_change():
            return see_other("/password")
        notice = "Your new password is set." if "changed" in request.query else None
        return html_response(
            pages.status_page(
                self.switch.unit,
                session.csrf_token,
                reload_error=self.switch.last_error,
                notice=notice,
            )
        )

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        if self.session_for(request) is not None:
            return see_other("/password" if self.owner_must_change() else "/")
        return self._login_page(request)

    def _login_page(
        self, request: web.Request, *, error: str | None = None
    ) -> web.Response:
        cookie = request.cookies.get(LOGIN_COOKIE) or self.login_forms.new_cookie()
        response = html_response(
            pages.login_page(self.login_forms.token_for(cookie), error=error)
        )
        _set_cookie(response, LOGIN_COOKIE, cookie)
        return response

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        cookie = request.cookies.get(LOGIN_COOKIE)
        expected = self.login_forms.token_for(cookie) if cookie else None
        refused = self.refuse_forgery(request, expected, form)
        if refused is not None:
            return refused
        client = _client(request)
        blocked = self._too_many(client)
        if blocked is not None:
            logger.warning("refused a login from %s: too many failures", client)
            return blocked

        credential = self._credential()
        if credential is None:
            logger.error("a login was tried but the unit has no admin credential")
            return self._login_page(
                request,
                error="This unit has no admin credential yet: restart the unit to "
                "make a setup credential, then log in with it.",
            )
        password = form_field(form, "password")
        if not await asyncio.to_thread(credential.check, password):
            self.limiter.record_failure(client)
            logger.warning(
                "failed admin login from %s (%d in the last 5 minutes)",
                client,
                self.limiter.failures(client),
            )
            return self._login_page(request, error="That password is not right.")

        self.limiter.record_success(client)
        self.sessions.delete(request.cookies.get(SESSION_COOKIE))
        logger.info("admin logged in from %s", client)
        response = see_other("/password" if credential.must_change else "/")
        self._start_session(response)
        _del_cookie(response, LOGIN_COOKIE)
        return response

    async def password_form(self, request: web.Request) -> web.StreamResponse:
        session = self.session_for(request)
        if session is None:
            return see_other("/login")
        return html_response(
            pages.password_page(
                session.csrf_token, must_change=self.owner_must_change()
            )
        )

    async def change_password(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        session = self.session_for(request)
        refused = self.refuse_forgery(
            request, session.csrf_token if session else None, form
        )
        if refused is not None or session is None:
            return refused or error_response(403)
        client = _client(request)
        blocked = self._too_many(client)
        if blocked is not None:
            return blocked

        must_change = self.owner_must_change()

        def again(error: str) -> web.Response:
            page = pages.password_page(
                session.csrf_token, must_change=must_change, error=error
            )
            return html_response(page, status=400)

        credential = self._credential()
        if credential is None:
            return again("This unit has no admin credential: restart the unit.")
        if not await asyncio.to_thread(credential.check, form_field(form, "current")):
            self.limiter.record_failure(client)
            logger.warning(
                "wrong current password in a password change from %s", client
            )
            what = "setup credential" if must_change else "current password"
            return again(f"The {what} is not right: type it again.")
        new, confirm = form_field(form, "new"), form_field(form, "confirm")
        if new != confirm:
            return again(
                "The two new passwords differ: type the same new password twice."
            )
        try:
            changed = await asyncio.to_thread(credential.with_password, new)
        except InputError as exc:
            return again(f"{str(exc)[:1].upper()}{str(exc)[1:]}.")

        try:
            await asyncio.to_thread(device.save_admin_credential, self.store, changed)
        except (UnitcertError, OSError) as exc:
            logger.error("could not save the new admin password: %s", exc)
            return again(
                "The unit could not save the new password; the old one still works."
            )
        await asyncio.to_thread(self.switch.reload)
        self.sessions.clear()
        logger.info("admin password changed from %s; other sessions ended", client)
        response = see_other("/?changed")
        self._start_session(response)
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        session = self.session_for(request)
        refused = self.refuse_forgery(
            request, session.csrf_token if session else None, form
        )
        if refused is not None:
            return refused
        self.sessions.delete(request.cookies.get(SESSION_COOKIE))
        logger.info("admin logged out from %s", _client(request))
        response = see_other("/login")
        _del_cookie(response, SESSION_COOKIE)
        return response

    async def stylesheet(self, _: web.Request) -> web.StreamResponse:
        return web.Response(text=pages.STYLESHEET, content_type="text/css")


def admin_app(store: StateStore, switch: CertificateSwitch) -> web.Application:
    """Build the HTTPS admin application.

    Args:
        store: the unit's state, where a new password is saved.
        switch: the certificate in force; its unit holds the admin credential.
    """
    handlers = AdminPages(store, switch)
    app = web.Application(middlewares=[_plain_errors], client_max_size=FORM_MAX_SIZE)
    app.on_response_prepare.append(_security_headers)
    app.router.add_get("/", handlers.status)
    app.router.add_get("/login", handlers.login_form)
    app.router.add_post("/login", handlers.login)
    app.router.add_get("/password", handlers.password_form)
    app.router.add_post("/password", handlers.change_password)
    app.router.add_post("/logout", handlers.logout)
    app.router.add_get("/style.css", handlers.stylesheet)
    from unitcert.web.acme_pages import add_acme_pages

    add_acme_pages(app, handlers)
    from unitcert.web.certificate import add_certificate_pages

    add_certificate_pages(app, handlers)
    return app
