"""The admin pages for the owner's own certificate: upload, preview, install,
choose what to serve, go back.

The flow is two steps so that nothing is installed unseen: the upload is
checked and shown (subject, names, chain, validity, key type, fingerprint
code), and only the "Install" button changes the state. Between the two, the
checked certificate and key wait in memory, bound to the session that
uploaded them, for at most :data:`PREVIEW_LIFETIME` seconds; nothing is
written to disk before the install.

The upload is the only request larger than the admin forms' 64 KiB: it may
be up to :data:`UPLOAD_MAX_SIZE` (a few files of at most 1 MiB each); a
larger one gets 413. Every state change is followed by a reload of the
served certificate, so the new one is served before the next page loads.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from dataclasses import dataclass
from html import escape

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import FileField
from multidict import MultiDict, MultiDictProxy

from unitcert import device
from unitcert.custom.bundle import InputFile, check_size
from unitcert.custom.chain import short_name
from unitcert.custom.check import Candidate
from unitcert.custom.install import (
    PENDING_CSR_FILE,
    can_revert,
    install_custom,
    pending_names,
    prepare_import,
    revert_choice,
    use_source,
)
from unitcert.errors import InputError, UnitcertError
from unitcert.spki import MAX_INPUT_BYTES
from unitcert.store import Part
from unitcert.web import admin
from unitcert.web.pages import (
    code_html,
    format_date,
    hidden_field,
    layout,
    message_html,
)

__all__ = [
    "PREVIEW_LIFETIME",
    "UPLOAD_MAX_SIZE",
    "add_certificate_pages",
    "certificate_page",
    "preview_page",
]

logger = logging.getLogger(__name__)

# A few files of at most 1 MiB each, with the multipart framing.
UPLOAD_MAX_SIZE = 4 * 1024 * 1024
PREVIEW_LIFETIME = 15 * 60.0
_MAX_PREVIEWS = 8
_LOWER_WORD = re.compile(r"[a-z]+[ ,:]")
_MAX_FILES = 6
_FILE_FIELDS = ("bundle", "key", "root")
_SOURCE_BUTTONS = {
    "self": "The unit's own certificate",
    "factory": "The maker's certificate",
    "acme": "The ACME (Let's Encrypt) certificate",
    "custom": "Your own certificate",
}
_Form = MultiDictProxy[str | bytes | bytearray | FileField]
_NO_FORM: _Form = MultiDictProxy(MultiDict())
_KEY_FROM = {
    "file": "given with the certificate",
    "pending": "made on this unit for your CSR: it never left the unit",
    "installed": "the key of your certificate already installed",
}


@dataclass(frozen=True)
class _Preview:
    candidate: Candidate
    csrf_token: str
    expires: float


def _sentence(text: str) -> str:
    """Make an error message a sentence; a leading name or file name keeps its case."""
    if _LOWER_WORD.match(text):
        text = f"{text[:1].upper()}{text[1:]}"
    return f"{text}."


def _row(name: str, value_html: str) -> str:
    return f"<tr><th>{escape(name)}</th><td>{value_html}</td></tr>"


def _served_html(unit: device.Unit) -> str:
    issuer = (
        "the unit itself (self-signed)"
        if unit.info.self_signed
        else short_name(unit.cert.issuer)
    )
    rows = [
        _row("Now serving", escape(device.describe_source(unit.source))),
        _row("Names", escape(", ".join(unit.info.names) or "(none)")),
        _row("Issued by", escape(issuer)),
        _row(
            "Valid",
            escape(
                f"from {format_date(unit.info.not_before)} "
                f"until {format_date(unit.info.not_after)}"
            ),
        ),
    ]
    sticker = ""
    if unit.identity_info is not None and unit.identity_info.code != unit.info.code:
        sticker = (
            f'<p class="hint">The code on the unit\'s sticker, '
            f"{escape(str(unit.identity_info.code))}, belongs to the unit's own "
            "certificate, which it serves again if you go back to it.</p>\n"
        )
    return (
        "<h2>What the unit serves now</h2>\n"
        "<p>Browsers that connect now see this fingerprint code:</p>\n"
        f"{code_html(str(unit.info.code))}\n"
        f"{sticker}"
        f"<table>\n{''.join(rows)}\n</table>\n"
    )


def _upload_form(csrf_token: str) -> str:
    return (
        "<h2>Install a certificate</h2>\n"
        "<p>Upload the certificate your CA issued for this unit, or one you bought. "
        "The unit shows what it found before anything is installed.</p>\n"
        '<form method="post" action="/certificate/preview" '
        'enctype="multipart/form-data">\n'
        f"{hidden_field(csrf_token)}\n"
        '<label for="bundle">Certificate file</label>\n'
        '<input type="file" id="bundle" name="bundle" multiple required>\n'
        '<p class="hint">PEM (.pem, .crt, .cer), DER, PKCS#7 (.p7b) or PKCS#12 '
        "(.pfx, .p12). It may hold the whole chain and the key, in any order.</p>\n"
        '<label for="key">Private key file (only if it is a separate file)</label>\n'
        '<input type="file" id="key" name="key">\n'
        '<p class="hint">Leave this empty if the key is in the certificate file, or '
        "if the unit made the key for your CSR.</p>\n"
        '<label for="password">Password (for a .pfx/.p12 file or an encrypted '
        "key)</label>\n"
        '<input type="password" id="password" name="password" '
        'autocomplete="off">\n'
        '<label for="root">Your CA\'s root certificate (optional)</label>\n'
        '<input type="file" id="root" name="root">\n'
        '<p class="hint">Give it to check the chain against your own root; the '
        "root itself is never served.</p>\n"
        '<button type="submit">Check the certificate</button>\n'
        "</form>\n"
    )


def _choices_html(
    unit: device.Unit, csrf_token: str, available: tuple[str, ...], can_revert: bool
) -> str:
    buttons = []
    current = unit.chosen or unit.meta.source
    for source in available:
        label = _SOURCE_BUTTONS[source]
        if source == current:
            buttons.append(f"<li>{escape(label)} <strong>(chosen)</strong></li>")
            continue
        buttons.append(
            '<li><form method="post" action="/certificate/use">'
            f"{hidden_field(csrf_token)}"
            f'<input type="hidden" name="source" value="{escape(source)}">'
            f'<button type="submit">Serve {escape(label.lower())}</button>'
            "</form></li>"
        )
    revert = ""
    if can_revert:
        revert = (
            '<form method="post" action="/certificate/revert">'
            f"{hidden_field(csrf_token)}"
            '<button type="submit">Go back to the previous certificate</button>'
            "</form>\n"
        )
    return f"<h2>Choose what to serve</h2>\n<ul>\n{''.join(buttons)}\n</ul>\n{revert}"


def certificate_page(
    unit: device.Unit,
    csrf_token: str,
    *,
    available: tuple[str, ...],
    can_revert: bool,
    pending_names: tuple[str, ...] = (),
    error: str | None = None,
    notice: str | None = None,
) -> str:
    """The page of the owner's certificate: what is served, upload, choices."""
    warnings = [_sentence(unit.served_note)] if unit.served_note else []
    pending = ""
    if pending_names:
        pending = (
            '<p class="notice">A key made on this unit is waiting for its '
            f"certificate (CSR for {escape(', '.join(pending_names))}). Upload the "
            "certificate alone: the unit matches it to that key.</p>\n"
        )
    refused = (
        f"The certificate was not installed, and the unit still serves the one "
        f"below. {_sentence(error)}"
        if error
        else None
    )
    body = (
        "<h1>Your own certificate</h1>\n"
        f"{message_html('error', refused)}"
        f"{message_html('notice', notice)}"
        f"{''.join(message_html('warning', w) for w in warnings)}"
        "<p>The unit always has its own certificate, whose code is on its sticker. "
        "You may also install one from your own certificate authority, or one you "
        "bought. This is optional, and you can go back at any time.</p>\n"
        f"{pending}"
        f"{_served_html(unit)}"
        f"{_upload_form(csrf_token)}"
        f"{_choices_html(unit, csrf_token, available, can_revert)}"
        f"{_nav(csrf_token)}"
    )
    return layout("Your own certificate", body)


def _nav(csrf_token: str) -> str:
    return (
        "<nav>\n"
        '<a href="/">Certificate status</a>\n'
        '<form method="post" action="/logout">'
        f"{hidden_field(csrf_token)}"
        '<button type="submit">Log out</button></form>\n'
        "</nav>"
    )


def preview_page(candidate: Candidate, csrf_token: str, preview_token: str) -> str:
    """What was found in the upload, and the button that installs it."""
    info = candidate.info
    chain = "<br>".join(
        f"{'&larr; ' if index else ''}{escape(entry.name)} "
        f'<span class="hint">({escape(entry.role)})</span>'
        for index, entry in enumerate(candidate.entries)
    )
    rows = [
        _row("Subject", escape(info.subject)),
        _row("Names", escape(", ".join(info.names))),
        _row("Issuer chain", chain),
        _row(
            "Valid",
            escape(
                f"from {format_date(info.not_before)} until "
                f"{format_date(info.not_after)}"
            ),
        ),
        _row("Key type", escape(info.key_type)),
        _row("Private key", escape(_KEY_FROM[candidate.key_origin])),
        _row("Files", escape(", ".join(candidate.files))),
    ]
    warnings = list(candidate.warnings)
    force = ""
    if candidate.name_warning:
        warnings.append(_sentence(candidate.name_warning))
        force = (
            '<label><input type="checkbox" name="force" value="1" required> '
            "Install it anyway: browsers reach this unit by one of the names "
            "above.</label>\n"
        )
    body = (
        "<h1>Check before installing</h1>\n"
        "<p>This is what the unit found in your files. Nothing is installed yet.</p>\n"
        f"{''.join(message_html('warning', w) for w in warnings)}"
        "<p>After installing, browsers will see this fingerprint code:</p>\n"
        f"{code_html(str(info.code))}\n"
        f"<table>\n{''.join(rows)}\n</table>\n"
        '<form method="post" action="/certificate/install">\n'
        f"{hidden_field(csrf_token)}\n"
        f'<input type="hidden" name="preview" value="{escape(preview_token)}">\n'
        f"{force}"
        '<button type="submit">Install this certificate</button>\n'
        "</form>\n"
        '<p><a href="/certificate">Cancel: keep the current certificate</a></p>\n'
        f"{_nav(csrf_token)}"
    )
    return layout("Check before installing", body)


class _CertificatePages:
    """The handlers, sharing the admin pages' sessions and certificate switch."""

    def __init__(self, pages: admin.AdminPages) -> None:
        self.admin = pages
        self.previews: dict[str, _Preview] = {}

    @property
    def unit(self) -> device.Unit:
        return self.admin.switch.unit

    def _available(self) -> tuple[str, ...]:
        local = self.admin.store.current(Part.LOCAL)
        found = [self.unit.meta.source]
        for source, files in device.LOCAL_SOURCES.items():
            if local is not None and all(local.has(name) for name in files):
                found.append(source)
        return tuple(found)

    def _page(
        self,
        csrf_token: str,
        *,
        error: str | None = None,
        notice: str | None = None,
        status: int = 200,
    ) -> web.Response:
        local = self.admin.store.current(Part.LOCAL)
        pending: tuple[str, ...] = ()
        if local is not None and local.has(PENDING_CSR_FILE):
            pending = pending_names(self.admin.store) or ("names not readable",)
        text = certificate_page(
            self.unit,
            csrf_token,
            available=self._available(),
            can_revert=can_revert(self.admin.store),
            pending_names=pending,
            error=error,
            notice=notice,
        )
        return admin.html_response(text, status=status)

    def _gate(self, request: web.Request) -> tuple[web.Response | None, str]:
        """Return a redirect unless the request has a session past the first login."""
        session = self.admin.session_for(request)
        if session is None:
            return admin.see_other("/login"), ""
        if self.admin.owner_must_change():
            return admin.see_other("/password"), ""
        return None, session.csrf_token

    async def _checked_form(
        self, request: web.Request, *, upload: bool = False
    ) -> tuple[web.Response | None, _Form, str]:
        """Read a POST form and refuse it without a session and a right token."""
        refused, csrf_token = self._gate(request)
        if refused is not None:
            return refused, _NO_FORM, ""
        if admin.is_cross_origin(request):
            return (
                self.admin.refuse_forgery(request, csrf_token, _NO_FORM),
                _NO_FORM,
                "",
            )
        reader = request.clone(client_max_size=UPLOAD_MAX_SIZE) if upload else request
        try:
            form = await reader.post()
        except (ValueError, HttpProcessingError) as exc:
            # A malformed body (a control character in a part header, a part
            # without a name) is the client's fault, not a failure of the page.
            logger.warning("could not read a form sent to %s: %s", request.path, exc)
            unreadable = admin.error_response(
                400,
                "Upload not readable",
                "The unit could not read what the browser sent: choose the files "
                "again and send the form once more.",
            )
            return unreadable, _NO_FORM, ""
        forged = self.admin.refuse_forgery(request, csrf_token, form)
        if forged is not None:
            return forged, _NO_FORM, ""
        return None, form, csrf_token

    def _expire(self) -> None:
        now = time.monotonic()
        for token, preview in list(self.previews.items()):
            if preview.expires < now:
                del self.previews[token]
        while len(self.previews) >= _MAX_PREVIEWS:
            del self.previews[next(iter(self.previews))]

    async def show(self, request: web.Request) -> web.StreamResponse:
        refused, csrf_token = self._gate(request)
        if refused is not None:
            return refused
        notice = None
        if "installed" in request.query or "changed" in request.query:
            notice = (
                "Done. The unit now serves the certificate below, with the code "
                f"{self.unit.info.code}."
            )
        return self._page(csrf_token, notice=notice)

    async def preview(self, request: web.Request) -> web.StreamResponse:
        refused, form, csrf_token = await self._checked_form(request, upload=True)
        if refused is not None:
            return refused
        try:
            files, roots = _uploaded_files(form)
            password = form.get("password")
            secret = password.encode("utf-8") if isinstance(password, str) else b""
            candidate = await asyncio.to_thread(
                prepare_import,
                self.admin.store,
                files,
                password=secret or None,
                ca_files=roots,
            )
        except UnitcertError as exc:
            logger.warning("refused an uploaded certificate: %s", exc)
            return self._page(csrf_token, error=str(exc), status=400)
        self._expire()
        token = secrets.token_urlsafe(24)
        self.previews[token] = _Preview(
            candidate, csrf_token, time.monotonic() + PREVIEW_LIFETIME
        )
        return admin.html_response(preview_page(candidate, csrf_token, token))

    async def install(self, request: web.Request) -> web.StreamResponse:
        refused, form, csrf_token = await self._checked_form(request)
        if refused is not None:
            return refused
        token = admin.form_field(form, "preview")
        preview = self.previews.get(token)
        if (
            preview is None
            or preview.csrf_token != csrf_token
            or preview.expires < time.monotonic()
        ):
            return self._page(
                csrf_token,
                error="this check has expired or was already installed: upload the "
                "certificate again",
                status=400,
            )
        try:
            await asyncio.to_thread(
                install_custom,
                self.admin.store,
                preview.candidate,
                force=admin.form_field(form, "force") == "1",
            )
        except UnitcertError as exc:
            return self._page(csrf_token, error=str(exc), status=400)
        del self.previews[token]
        await asyncio.to_thread(self.admin.switch.reload)
        logger.info("the owner installed a custom certificate from the admin page")
        return admin.see_other("/certificate?installed")

    async def use(self, request: web.Request) -> web.StreamResponse:
        refused, form, csrf_token = await self._checked_form(request)
        if refused is not None:
            return refused
        try:
            await asyncio.to_thread(
                use_source, self.admin.store, admin.form_field(form, "source")
            )
        except UnitcertError as exc:
            return self._page(csrf_token, error=str(exc), status=400)
        await asyncio.to_thread(self.admin.switch.reload)
        return admin.see_other("/certificate?changed")

    async def revert(self, request: web.Request) -> web.StreamResponse:
        refused, _, csrf_token = await self._checked_form(request)
        if refused is not None:
            return refused
        try:
            await asyncio.to_thread(revert_choice, self.admin.store)
        except UnitcertError as exc:
            return self._page(csrf_token, error=str(exc), status=400)
        await asyncio.to_thread(self.admin.switch.reload)
        return admin.see_other("/certificate?changed")


def _file_name(uploaded: str) -> str:
    """The uploaded file's name as messages and logs may show it."""
    base = uploaded.replace("\\", "/").rsplit("/", 1)[-1]
    printable = "".join(ch for ch in base if ch.isprintable())[:80]
    return printable or "the uploaded file"


def _uploaded_files(form: _Form) -> tuple[list[InputFile], list[InputFile]]:
    """Return the certificate/key files and the root files of an upload.

    Raises:
        InputError: a file is over 1 MiB, or there are too many files.
    """
    files: list[InputFile] = []
    roots: list[InputFile] = []
    for name in _FILE_FIELDS:
        for field in form.getall(name, []):
            if not isinstance(field, FileField) or not field.filename:
                continue
            data = field.file.read(MAX_INPUT_BYTES + 1)
            target = roots if name == "root" else files
            target.append(check_size(InputFile(_file_name(field.filename), data)))
    if len(files) + len(roots) > _MAX_FILES:
        raise InputError(f"upload at most {_MAX_FILES} files at once")
    return files, roots


def add_certificate_pages(app: web.Application, pages: admin.AdminPages) -> None:
    """Add the owner's certificate pages to the admin application."""
    handlers = _CertificatePages(pages)
    app.router.add_get("/certificate", handlers.show)
    app.router.add_post("/certificate/preview", handlers.preview)
    app.router.add_post("/certificate/install", handlers.install)
    app.router.add_post("/certificate/use", handlers.use)
    app.router.add_post("/certificate/revert", handlers.revert)
