"""The audit's report: a summary on the terminal, JSON with every finding, HTML.

The HTML report is one self-contained file (inline CSS and SVG, no script,
nothing fetched) that a manager can open and read: the verdict, charts of
findings by kind, by key type and by production batch or issue month, and
the list of findings with the units they name. No report carries a private
key or a prime.

Every report states one verdict: ``findings`` (something was found; this wins),
``incomplete`` (nothing was found, but a host or registry row the user named
could not be read, so the fleet is not known to be clean) or ``clean``
(nothing was found and everything named was read). The JSON carries it as
``"verdict"``, with ``"clean"`` true only for a clean verdict and
``"complete"`` false when a named item was not read.

Names come from file systems, hosts and registries: a file name that is not
UTF-8 is shown with its bytes escaped (``bad\\xff.pem``) in every report, and
control characters in names printed to the terminal are shown escaped
(``\\x1b``), so that no name can restyle or move the terminal.
"""

from __future__ import annotations

import errno
import html
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from unitcert.audit.checks import KINDS, AffectedUnit, Finding
from unitcert.audit.runner import (
    VERDICT_CLEAN,
    VERDICT_INCOMPLETE,
    AuditReport,
    count,
)
from unitcert.errors import InputError
from unitcert.store import write_output_file

__all__ = [
    "JSON_VERDICTS",
    "display_text",
    "print_summary",
    "report_json",
    "terminal_text",
    "write_html",
    "write_json",
]

_UNITS_SHOWN = 5
_HTML_UNITS_SHOWN = 50
_MISSED_SHOWN = 5

JSON_VERDICTS = {
    "findings": "some key is shared, weak or known: see findings (this wins over "
    "incomplete)",
    "incomplete": "nothing was found among the units read, but hosts or registry "
    "rows that were named could not be read (problems with named true): the "
    "fleet is not known to be clean",
    "clean": "nothing was found and every named host and registry row was read",
}

# C0 and C1 controls, DEL, and the Unicode controls that reorder or hide text.
_CONTROLS = re.compile(
    "[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)


def display_text(text: str) -> str:
    """Return ``text`` safe to encode as UTF-8: undecodable bytes as ``\\xff``.

    File names that are not UTF-8 reach Python as lone surrogates
    (:pep:`383`); they are shown as the bytes they stand for.
    """
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def _escape_control(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal_text(text: str) -> str:
    """Return ``text`` safe to print: :func:`display_text`, controls escaped.

    An escape sequence in a file name is shown as ``\\x1b[31m``, as ``ls -b``
    shows it, instead of restyling the terminal.
    """
    return _CONTROLS.sub(_escape_control, display_text(text))


def _shown(text: str) -> str:
    """A name for rich: terminal-safe, and no ``[style]`` markup read in it."""
    return escape(terminal_text(text))


def _h(text: str) -> str:
    """A name for HTML: controls visible, markup escaped."""
    return html.escape(terminal_text(text))


def _common_folder(report: AuditReport) -> str | None:
    """The folder that every file unit of the findings is under, if any."""
    names = {u.name for f in report.findings for u in f.units if u.source == "file"}
    # A file unit's name is its path (maybe with "#N"): its folder is the
    # name's parent, whatever the name itself looks like.
    folders = {os.path.dirname(n) for n in names if os.path.isabs(n)}
    if not folders:
        return None
    folder = os.path.commonpath(list(folders))
    return folder if folder != os.sep else None


def _units_text(
    units: Sequence[AffectedUnit], folder: str | None, shown: int = _UNITS_SHOWN
) -> str:
    names = [
        os.path.relpath(u.name, folder)
        if folder and u.source == "file" and u.name.startswith(folder + os.sep)
        else u.name
        for u in units[:shown]
    ]
    more = len(units) - shown
    # Names come from files and hosts: never let them style the terminal.
    return ", ".join(_shown(n) for n in names) + (
        f" and {more} more" if more > 0 else ""
    )


def _missed_text(report: AuditReport) -> str:
    missed = report.missed
    first = missed[0]
    return (
        f"{count(len(missed), 'host or registry unit', 'hosts or registry units')} "
        f"given could not be read (first: {first.location}: {first.reason})"
    )


class _SummaryConsole(Console):
    """A console that lets a closed stdout be the caller's error.

    Rich's own answer to a broken pipe is to exit with status 1, which is the
    audit's code for findings.
    """

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def print_summary(report: AuditReport, console: Console | None = None) -> None:
    """Print the verdict, counts per kind and the first findings of each kind.

    Raises:
        OSError: standard output cannot be written (``BrokenPipeError`` when
            it was closed early).
    """
    console = console or _SummaryConsole()
    console.print(
        f"Audited {count(report.units, 'unit')} "
        f"({count(report.distinct_keys, 'distinct key')}, "
        f"{count(report.rsa_moduli, 'RSA modulus', 'RSA moduli')}) from "
        f"{_shown(', '.join(report.sources))} in {report.seconds:.1f} s; batch GCD on "
        f"{_shown(report.mode)}."
    )
    if report.problems:
        first = report.missed[0] if report.missed else report.problems[0]
        console.print(
            f"[yellow]{count(len(report.problems), 'item')} could not be read and "
            f"{'is' if len(report.problems) == 1 else 'are'} not audited[/yellow], "
            f"e.g. {_shown(first.location)}: {_shown(first.reason)} (--json lists "
            "every one)"
        )
    if report.verdict == VERDICT_INCOMPLETE:
        console.print(
            f"[bold yellow]Not known to be clean:[/] no shared, weak or known keys "
            f"among the {count(report.units, 'unit')} read, but "
            f"{_shown(_missed_text(report))}."
        )
        return
    if report.verdict == VERDICT_CLEAN:
        scope = " among the units read" if report.problems else ""
        console.print(
            f"[bold green]No findings{scope}: no shared, weak or known keys.[/]"
        )
        return

    folder = _common_folder(report)
    title = "Findings" + (f" (files under {_shown(folder)})" if folder else "")
    table = Table(title=title, show_lines=False)
    table.add_column("Kind")
    table.add_column("Findings", justify="right")
    table.add_column("Units", justify="right")
    table.add_column("Examples", overflow="fold")
    by_kind: dict[str, list[Finding]] = {}
    for finding in report.findings:
        by_kind.setdefault(finding.kind, []).append(finding)
    for kind, findings in by_kind.items():
        units = sorted({u.name for f in findings for u in f.units})
        examples = "\n".join(_units_text(f.units, folder, 3) for f in findings[:2])
        table.add_row(
            KINDS.get(kind, kind), f"{len(findings):,}", f"{len(units):,}", examples
        )
    console.print(table)
    console.print(
        f"[bold red]{count(len(report.findings), 'finding')} on "
        f"{count(report.affected_units, 'unit')}.[/] --json lists every unit of "
        "every finding; --html adds charts."
    )
    if report.incomplete:
        console.print(f"[yellow]Also, {_shown(_missed_text(report))}.[/]")


def _unit_json(unit: AffectedUnit) -> dict[str, Any]:
    return {
        "name": unit.name,
        "source": unit.source,
        "locations": list(unit.locations),
        "key_type": unit.key_type,
        "code": unit.code,
        "subject": unit.subject,
        "batch": unit.batch,
        "issued": unit.issued.isoformat() if unit.issued else None,
    }


def report_json(report: AuditReport) -> dict[str, Any]:
    """Return the report as JSON-ready data, with every finding and unit.

    ``"verdict"`` is the one field to read (see the module's docstring);
    ``"verdicts"`` says what each value means. Every string is UTF-8 safe:
    bytes of a file name that are not UTF-8 appear as ``\\xff``.
    """
    data: dict[str, Any] = {
        "verdict": report.verdict,
        "verdicts": JSON_VERDICTS,
        "clean": report.clean,
        "complete": not report.incomplete,
        "not_read": len(report.missed),
        "started": report.started.isoformat(),
        "seconds": round(report.seconds, 3),
        "mode": report.mode,
        "sources": list(report.sources),
        "keys_read": report.keys_read,
        "units": report.units,
        "distinct_keys": report.distinct_keys,
        "rsa_moduli": report.rsa_moduli,
        "affected_units": report.affected_units,
        "key_types": dict(report.key_types),
        "cohort_kind": report.cohort_kind,
        "cohorts": [
            {"label": c.label, "units": c.units, "affected": c.affected}
            for c in report.cohorts
        ],
        "findings": [
            {
                "kind": f.kind,
                "title": f.title,
                "detail": f.detail,
                "key_type": f.key_type,
                "factored": f.factored,
                "factor_id": f.factor_id,
                "units": [_unit_json(u) for u in f.units],
            }
            for f in report.findings
        ],
        "problems": [
            {"location": p.location, "reason": p.reason, "named": p.named}
            for p in report.problems
        ],
    }
    safe: dict[str, Any] = _json_safe(data)
    return safe


def _json_safe(value: Any) -> Any:
    if isinstance(value, str):
        return display_text(value)
    if isinstance(value, dict):
        return {display_text(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _write(path: Path, text: str) -> None:
    """Write a report whole or not at all (a device such as /dev/null as it is)."""
    try:
        write_output_file(path, text.encode("utf-8"), mode=0o644)
    except OSError as exc:
        raise InputError(
            f"cannot write the report to {path}: {exc.strerror or exc}"
        ) from None


def write_json(report: AuditReport, path: Path) -> None:
    """Write :func:`report_json` to ``path``.

    Raises:
        InputError: the file cannot be written.
    """
    _write(path, json.dumps(report_json(report), indent=2) + "\n")


# --- HTML -------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:72rem;color:#1d2330;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem}
.meta{color:#5b6475;font-size:.9rem}
.verdict{padding:1rem 1.2rem;border-radius:.5rem;font-size:1.15rem;margin:1.2rem 0}
.clean{background:#e3f5e8;border-left:.4rem solid #2f9e55}
.bad{background:#fde8e8;border-left:.4rem solid #c9302c}
.incomplete{background:#fff4dc;border-left:.4rem solid #d9822b}
.verdict ul{font-size:1rem;margin:.4rem 0 0}
.tiles{display:flex;gap:1rem;flex-wrap:wrap}
.tile{background:#f3f5f9;border-radius:.5rem;padding:.8rem 1rem;min-width:9rem}
.tile b{display:block;font-size:1.5rem}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(30rem,1fr));gap:1.5rem}
figure{margin:0}figcaption{font-weight:600;margin-bottom:.4rem}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{text-align:left;padding:.35rem .5rem;border-bottom:1px solid #e1e5ec;
vertical-align:top}
th{background:#f3f5f9}code{font-size:.85rem}
.kind{font-weight:600}.factored{color:#c9302c;font-weight:600}
details summary{cursor:pointer;color:#2857b8}
"""


def _bar_chart(
    rows: Sequence[tuple[str, int, int | None]], *, colour: str, total_label: str = ""
) -> str:
    """An SVG of horizontal bars: (label, value, optional total behind it)."""
    if not rows:
        return '<p class="meta">Nothing to show.</p>'
    width, bar_left, row_height = 560, 230, 26
    texts = [
        (f"{v:,}" if t is None else f"{v:,} of {t:,}{total_label}")
        + (f" ({100 * v / t:.0f}%)" if t else "")
        for _, v, t in rows
    ]
    # Room after the longest bar for the longest value text (about 7.5 px a
    # character at 13 px), so that no text runs off the chart.
    reserve = 12 + 7.5 * max(len(text) for text in texts)
    peak = max(max(v, t or 0) for _, v, t in rows) or 1
    scale = (width - bar_left - reserve) / peak
    height = row_height * len(rows) + 8
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="100%" role="img" font-family="system-ui,sans-serif" font-size="13">'
    ]
    for index, ((label, value, total), text) in enumerate(
        zip(rows, texts, strict=True)
    ):
        y = 4 + index * row_height
        short = label if len(label) <= 32 else label[:31] + "…"
        parts.append(
            f'<text x="{bar_left - 6}" y="{y + 15}" text-anchor="end">'
            f"<title>{_h(label)}</title>{_h(short)}</text>"
        )
        if total is not None:
            parts.append(
                f'<rect x="{bar_left}" y="{y + 3}" '
                f'width="{max(1.0, total * scale):.1f}" height="16" fill="#d9dee8"/>'
            )
        parts.append(
            f'<rect x="{bar_left}" y="{y + 3}" width="{value * scale:.1f}" height="16" '
            f'fill="{colour}"/>'
        )
        end = max(value, total or 0) * scale
        parts.append(
            f'<text x="{bar_left + end + 6:.1f}" y="{y + 15}">{_h(text)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _tile(value: str, label: str) -> str:
    return f'<div class="tile"><b>{_h(value)}</b>{_h(label)}</div>'


def _finding_rows(report: AuditReport) -> str:
    rows = []
    for finding in report.findings:
        units = finding.units
        listed = "".join(
            f"<li>{_h(u.name)}"
            + (f" <span class='meta'>({_h(u.subject)})</span>" if u.subject else "")
            + f" <code>{_h(u.code)}</code></li>"
            for u in units[:_HTML_UNITS_SHOWN]
        )
        if len(units) > _HTML_UNITS_SHOWN:
            listed += (
                f"<li>… and {len(units) - _HTML_UNITS_SHOWN:,} more (see JSON)</li>"
            )
        status = '<span class="factored">factored</span>' if finding.factored else ""
        rows.append(
            "<tr>"
            f'<td class="kind">{_h(finding.title)}</td>'
            f"<td>{_h(finding.key_type)} {status}</td>"
            f"<td>{_h(finding.detail)}"
            f"<details><summary>{count(len(units), 'unit')}</summary><ul>{listed}</ul>"
            "</details></td></tr>"
        )
    return "".join(rows)


def _html_missed(report: AuditReport) -> str:
    """The named items not read: how many, and the first reasons, in view."""
    missed = report.missed
    shown = "".join(
        f"<li>{_h(p.location)}: {_h(p.reason)}</li>" for p in missed[:_MISSED_SHOWN]
    )
    more = (
        f"<li>… and {len(missed) - _MISSED_SHOWN:,} more (see below)</li>"
        if len(missed) > _MISSED_SHOWN
        else ""
    )
    return (
        f"{count(len(missed), 'host or registry unit', 'hosts or registry units')} "
        f"given could not be read:<ul>{shown}{more}</ul>"
    )


def _html_verdict(report: AuditReport) -> str:
    if report.verdict == VERDICT_CLEAN:
        return (
            f'<div class="verdict clean">Clean: none of the {report.units:,} units '
            "has a shared, weak or known key, and every host and registry unit "
            "given was read.</div>"
        )
    if report.verdict == VERDICT_INCOMPLETE:
        return (
            '<div class="verdict incomplete"><b>Incomplete: not known to be '
            f"clean.</b> None of the {report.units:,} units read has a shared, "
            f"weak or known key, but {_html_missed(report)}</div>"
        )
    factored = len({u.name for f in report.findings if f.factored for u in f.units})
    also = (
        f'<p class="incomplete-note">Also, {_html_missed(report)}</p>'
        if report.incomplete
        else ""
    )
    return (
        f'<div class="verdict bad"><b>{report.affected_units:,} of '
        f"{report.units:,} units need attention</b>: "
        f"{len(report.findings):,} findings; the keys of "
        f"{factored:,} units are factored or otherwise known and must be replaced "
        f"first.{also}</div>"
    )


def render_html(report: AuditReport) -> str:
    """Return the self-contained HTML report."""
    kinds = Counter(f.kind for f in report.findings)
    kind_rows = [(KINDS.get(k, k), kinds[k], None) for k in KINDS if kinds[k]]
    affected_by_type: Counter[str] = Counter()
    for finding in report.findings:
        for unit in finding.units:
            affected_by_type[unit.key_type] += 1
    type_rows = [
        (key_type, affected_by_type[key_type], total)
        for key_type, total in report.key_types
    ]
    cohort_rows = [(c.label, c.affected, c.units) for c in report.cohorts]

    verdict = _html_verdict(report)
    problems = ""
    if report.problems:
        # What the user named and the audit missed first, shown; files met in
        # folders that held no key after it, folded.
        ordered = sorted(report.problems, key=lambda p: not p.named)
        items = "".join(
            f"<li>{_h(p.location)}: {_h(p.reason)}</li>" for p in ordered[:200]
        )
        more = (
            f"<li>… and {len(ordered) - 200:,} more (see JSON)</li>"
            if len(ordered) > 200
            else ""
        )
        opened = " open" if report.missed else ""
        problems = (
            f"<h2>Not read ({len(report.problems):,})</h2><details{opened}><summary>"
            f"Show</summary><ul>{items}{more}</ul></details>"
        )
    findings_table = (
        "<table><tr><th>Finding</th><th>Key</th><th>What it means</th></tr>"
        f"{_finding_rows(report)}</table>"
        if report.findings
        else '<p class="meta">No findings.</p>'
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>unitcert fleet audit, {report.started:%Y-%m-%d}</title>
<style>{_CSS}</style></head><body>
<h1>Fleet key audit</h1>
<p class="meta">{report.started:%Y-%m-%d %H:%M} UTC · sources: \
{_h(", ".join(report.sources))} · batch GCD on {_h(report.mode)} · \
{report.seconds:.1f} s</p>
{verdict}
<div class="tiles">{_tile(f"{report.units:,}", "units")}\
{_tile(f"{report.distinct_keys:,}", "distinct keys")}\
{_tile(f"{report.rsa_moduli:,}", "RSA moduli checked for shared primes")}\
{_tile(f"{report.affected_units:,}", "units with findings")}</div>
<h2>Charts</h2><div class="charts">
<figure><figcaption>Findings by kind</figcaption>\
{_bar_chart(kind_rows, colour="#c9302c")}</figure>
<figure><figcaption>Affected units by key type</figcaption>\
{_bar_chart(type_rows, colour="#d9822b", total_label=" units")}</figure>
<figure><figcaption>Affected units by {_h(report.cohort_kind)}</figcaption>\
{_bar_chart(cohort_rows, colour="#2857b8", total_label=" units")}</figure>
</div>
<h2>Findings</h2>{findings_table}
{problems}
<p class="meta">A shared prime is named by a hash, never by its value; no private key
appears in this report. Units are named by serial, file or address.</p>
</body></html>
"""


def write_html(report: AuditReport, path: Path) -> None:
    """Write :func:`render_html` to ``path``.

    Raises:
        InputError: the file cannot be written.
    """
    _write(path, render_html(report))
