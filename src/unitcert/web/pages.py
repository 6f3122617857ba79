"""The admin pages' HTML, rendered on the server.

Plain HTML and one same-origin stylesheet, no scripts: the content security
policy allows nothing else. Every value that comes from outside this module
goes through :func:`html.escape`.
"""

from __future__ import annotations

import datetime as dt
from html import escape

from unitcert import device
from unitcert.credential import MIN_PASSWORD_LENGTH
from unitcert.device import Unit

__all__ = [
    "STYLESHEET",
    "error_page",
    "login_page",
    "password_page",
    "status_page",
]

STYLESHEET = """\
body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto;
       padding: 0 1rem; color: #1b1b1b; background: #fafafa; line-height: 1.5; }
h1 { font-size: 1.6rem; margin-bottom: 0.5rem; }
.code { font-family: ui-monospace, monospace; font-size: 2.2rem; font-weight: bold;
        letter-spacing: 0.08em; background: #fff; border: 2px solid #1b1b1b;
        border-radius: 0.4rem; padding: 0.6rem 1rem; display: inline-block; }
.code span { margin-right: 0.6em; }
.code span:last-child { margin-right: 0; }
.warning { background: #fff3cd; border: 2px solid #b8860b; border-radius: 0.4rem;
           padding: 0.6rem 1rem; }
.error { background: #fde2e1; border: 2px solid #b22222; border-radius: 0.4rem;
         padding: 0.6rem 1rem; }
.notice { background: #e3f4e1; border: 2px solid #2e7d32; border-radius: 0.4rem;
          padding: 0.6rem 1rem; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; vertical-align: top; padding: 0.4rem 0.6rem;
         border-bottom: 1px solid #ddd; }
th { width: 12rem; font-weight: 600; }
td.mono { font-family: ui-monospace, monospace; word-break: break-all; }
label { display: block; margin-top: 0.8rem; font-weight: 600; }
input[type=password] { font-size: 1.1rem; padding: 0.4rem; width: 100%;
                       max-width: 24rem; box-sizing: border-box; }
button { font-size: 1rem; margin-top: 1rem; padding: 0.4rem 1.2rem; }
nav { margin-top: 2rem; display: flex; gap: 1.5rem; align-items: baseline; }
nav form button { margin-top: 0; }
.hint { color: #555; font-size: 0.95rem; }
"""


def layout(title: str, body: str) -> str:
    return (
        "<!doctype html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n"
        '<link rel="stylesheet" href="/style.css">\n'
        f"</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def message_html(kind: str, text: str | None) -> str:
    if not text:
        return ""
    return f'<p class="{kind}" role="alert">{escape(text)}</p>\n'


def hidden_field(csrf_token: str) -> str:
    return f'<input type="hidden" name="csrf_token" value="{escape(csrf_token)}">'


def code_html(code: str) -> str:
    groups = "".join(f"<span>{escape(group)}</span>" for group in code.split("-"))
    return f'<p class="code" aria-label="fingerprint code {escape(code)}">{groups}</p>'


def format_date(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%d %B %Y, %H:%M UTC")


def _validity(unit: Unit, now: dt.datetime) -> str:
    info = unit.info
    text = f"from {format_date(info.not_before)} until {format_date(info.not_after)}"
    if info.expired(now):
        return f"{text} (not valid now: check the unit's clock)"
    days = (info.not_after - now).days
    return f"{text} ({days} days left)"


_SOURCE_HELP = {
    "self": (
        "The unit made this certificate itself. Browsers warn about it; the code "
        "above is how you know it is your unit."
    ),
    "factory": "The maker's certificate authority signed this certificate.",
}


def login_page(csrf_token: str, *, error: str | None = None) -> str:
    """The login form."""
    body = (
        "<h1>Log in to this unit</h1>\n"
        f"{message_html('error', error)}"
        '<form method="post" action="/login">\n'
        f"{hidden_field(csrf_token)}\n"
        '<label for="password">Password</label>\n'
        '<input type="password" id="password" name="password" required '
        'autocomplete="current-password" autofocus>\n'
        '<p class="hint">The first time, use the setup credential shown on the '
        "unit's console or printed on its sticker. You will then choose your own "
        "password.</p>\n"
        '<button type="submit">Log in</button>\n'
        "</form>"
    )
    return layout("Log in", body)


def password_page(
    csrf_token: str, *, must_change: bool, error: str | None = None
) -> str:
    """The form that sets a new admin password."""
    if must_change:
        heading = "Choose your own password"
        intro = (
            '<p class="warning">The setup credential works only until you choose '
            "your own password. Choose it now to continue.</p>\n"
        )
        current_label = "Setup credential"
    else:
        heading = "Change the password"
        intro = ""
        current_label = "Current password"
    body = (
        f"<h1>{heading}</h1>\n"
        f"{intro}"
        f"{message_html('error', error)}"
        '<form method="post" action="/password">\n'
        f"{hidden_field(csrf_token)}\n"
        f'<label for="current">{current_label}</label>\n'
        '<input type="password" id="current" name="current" required '
        'autocomplete="current-password">\n'
        '<label for="new">New password</label>\n'
        '<input type="password" id="new" name="new" required '
        f'minlength="{MIN_PASSWORD_LENGTH}" autocomplete="new-password">\n'
        '<label for="confirm">New password again</label>\n'
        '<input type="password" id="confirm" name="confirm" required '
        f'minlength="{MIN_PASSWORD_LENGTH}" autocomplete="new-password">\n'
        f'<p class="hint">At least {MIN_PASSWORD_LENGTH} characters. A new '
        "password ends every other open session.</p>\n"
        '<button type="submit">Set the password</button>\n'
        "</form>\n"
        f"{_nav(csrf_token, status_link=not must_change)}"
    )
    return layout(heading, body)


def _nav(
    csrf_token: str, *, status_link: bool = True, password_link: bool = False
) -> str:
    links = []
    if status_link:
        links.append('<a href="/">Certificate status</a>')
    if password_link:
        links.append('<a href="/password">Change the password</a>')
        links.append('<a href="/certificate">Your own certificate</a>')
        links.append('<a href="/acme">ACME certificate</a>')
    links.append(
        '<form method="post" action="/logout">'
        f"{hidden_field(csrf_token)}"
        '<button type="submit">Log out</button></form>'
    )
    return "<nav>\n" + "\n".join(links) + "\n</nav>"


def _row(name: str, value: str, hint: str) -> str:
    cell = '<td class="mono">' if name == "SPKI pin" else "<td>"
    extra = f'<br><span class="hint">{escape(hint)}</span>' if hint else ""
    return f"<tr><th>{escape(name)}</th>{cell}{escape(value)}{extra}</td></tr>"


def status_page(
    unit: Unit,
    csrf_token: str,
    *,
    reload_error: str | None = None,
    notice: str | None = None,
    now: dt.datetime | None = None,
) -> str:
    """The status page: the fingerprint code first, then the certificate's facts."""
    now = now or dt.datetime.now(dt.UTC)
    info = unit.info
    warnings = []
    if not unit.binding_ok:
        warnings.append(
            "This unit's state was made on another machine (a copied disk image?). "
            "Its key may be shared with other units: have the maker check this unit."
        )
    if unit.served_note:
        warnings.append(f"{unit.served_note[0].upper()}{unit.served_note[1:]}.")
    if reload_error:
        warnings.append(
            "The unit could not load its latest settings and keeps serving the "
            f"certificate below: {reload_error}"
        )
    rows = [
        (
            "Source",
            device.describe_source(unit.source),
            _SOURCE_HELP.get(unit.source, ""),
        ),
        ("Host name", unit.meta.hostname, ""),
        ("Names in the certificate", ", ".join(info.names) or "(none)", ""),
        ("Valid", _validity(unit, now), ""),
        ("Key type", info.key_type, ""),
        ("SPKI pin", f"sha256//{info.pin}", "For curl --pinnedpubkey."),
        ("State generation", str(unit.generation), ""),
    ]
    table = "\n".join(_row(name, value, hint) for name, value, hint in rows)
    body = (
        "<h1>This unit's fingerprint code</h1>\n"
        f"{message_html('notice', notice)}"
        f"{''.join(message_html('warning', w) for w in warnings)}"
        f"{code_html(str(info.code))}\n"
        "<p>Compare it with the code on your sticker. If every symbol is the same, "
        "this page came from your unit and its own key. If it differs, you are not "
        "talking to your unit: do not log in here again.</p>\n"
        f"<table>\n{table}\n</table>\n"
        f"{_nav(csrf_token, status_link=False, password_link=True)}"
    )
    return layout("Unit status", body)


def error_page(status: int, title: str, message: str) -> str:
    """A plain page for an error status, with a way back."""
    body = (
        f"<h1>{escape(title)}</h1>\n"
        f"<p>{escape(message)}</p>\n"
        f'<p class="hint">HTTP status {status}. '
        '<a href="/">Go to the start page</a>.</p>'
    )
    return layout(title, body)
