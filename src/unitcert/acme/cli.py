"""``unitcert device acme``: set up, show, retry and turn off ACME on a unit.

The command never talks to the CA itself (only ``serve`` does): it checks and
saves the settings with an "order now" request, then waits for the running
``serve`` to record the outcome. With no ``serve`` running it says so; the
unit orders when ``serve`` starts.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import time
from pathlib import Path

import click

from unitcert import device
from unitcert.acme import agent
from unitcert.acme.schedule import Outcome
from unitcert.acme.settings import (
    CHALLENGES,
    AcmeSettings,
    check_ca_bundle,
    check_hook,
    check_identifier,
    is_ip,
    parse_tsig_key,
    read_small_file,
)
from unitcert.cli import state_option
from unitcert.errors import InputError
from unitcert.store import Part, StateStore

__all__ = ["acme_command", "device_commands", "echo_status"]

# Exit code when serve has not finished the order within --wait (EX_TEMPFAIL).
_EXIT_STILL_RUNNING = 75
_WAIT_POLL = 0.1


def _field(name: str, value: object) -> None:
    click.echo(f"  {name + ':':<14}{value}")


def _fmt(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def echo_status(store: StateStore) -> None:
    """Print the ACME settings and status of a unit."""
    status = agent.load_status(store)
    if status.settings is None:
        click.echo(
            "ACME is not set up on this unit: run 'unitcert device acme --state "
            f"{store.root} --directory URL --domain NAME'."
        )
        return
    state = "on" if status.settings.enabled else "off"
    click.echo(f"ACME is {state} for {store.root}:")
    for name, value in status.settings.describe():
        _field(name, value)
    if status.cert is not None:
        served = "served now" if status.served else "not served"
        _field(
            "Certificate",
            f"{', '.join(status.cert.names)}, valid until "
            f"{_fmt(status.cert.not_after)} ({served})",
        )
    else:
        _field("Certificate", "none yet")
    if status.note:
        _field("Note", status.note)
    outcome = status.state.outcome
    if outcome is not None:
        result = "ok" if outcome.ok else "failed"
        _field("Last attempt", f"{_fmt(outcome.at)}: {result}: {outcome.message}")
    if status.decision is not None:
        if status.decision.order:
            _field("Next attempt", f"now ({status.decision.reason})")
        else:
            _field("Next attempt", status.decision.reason)


def _settings_from_options(
    store: StateStore,
    *,
    directory: str | None,
    domains: tuple[str, ...],
    email: str | None,
    challenge: str,
    profile: str | None,
    dns_server: str | None,
    tsig_key_file: Path | None,
    dns_hook: str | None,
    deploy_hook: str | None,
    production: bool,
    ca_bundle: Path | None,
) -> tuple[AcmeSettings, bytes | None, bytes | None]:
    if directory is None:
        local = store.current(Part.LOCAL)
        previous = agent.load_settings(local)
        if previous is None:
            raise InputError(
                "no --directory given: name the ACME CA's directory URL, e.g. "
                "https://acme-staging-v02.api.letsencrypt.org/directory"
            )
        directory = previous.directory
    identifiers = tuple(check_identifier(d) for d in domains)
    bundle = (
        check_ca_bundle(read_small_file(ca_bundle, "CA bundle")) if ca_bundle else None
    )
    tsig = None
    if tsig_key_file is not None:
        tsig = read_small_file(tsig_key_file, "TSIG key file")
        try:
            parse_tsig_key(tsig.decode("utf-8"))
        except UnicodeDecodeError:
            raise InputError(
                "the TSIG key file is not text: give a BIND key file"
            ) from None
    settings = AcmeSettings(
        directory=directory,
        identifiers=identifiers,
        email=email,
        challenge=challenge,
        profile=profile,
        dns_server=dns_server,
        dns_hook=check_hook(dns_hook, "--dns-hook") if dns_hook else None,
        deploy_hook=check_hook(deploy_hook, "--deploy-hook") if deploy_hook else None,
        production=production,
        has_ca_bundle=bundle is not None,
        has_tsig=tsig is not None,
    )
    return settings, bundle, tsig


def _wait_for(store: StateStore, request_id: str, wait: float) -> Outcome | None:
    deadline = time.monotonic() + wait
    while True:
        outcome = agent.load_state(store.current(Part.LOCAL)).outcome
        if outcome is not None and outcome.request_id == request_id:
            return outcome
        if time.monotonic() >= deadline:
            return None
        time.sleep(_WAIT_POLL)


@click.command("acme")
@state_option
@click.option("--directory", help="The ACME CA's directory URL (https).")
@click.option(
    "--domain",
    "domains",
    multiple=True,
    help="A public DNS name or IP address for the certificate (repeatable).",
)
@click.option("--email", help="A contact address for the ACME account.")
@click.option(
    "--challenge",
    type=click.Choice(CHALLENGES),
    default="http-01",
    show_default=True,
    help="How to prove control: the unit's HTTP port, or a DNS TXT record.",
)
@click.option("--profile", help="The certificate profile to ask the CA for.")
@click.option(
    "--ca-bundle",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The root (PEM) that the CA's own HTTPS is checked with (test CAs).",
)
@click.option(
    "--dns-server",
    metavar="HOST:PORT",
    help="DNS-01: the primary DNS server (RFC 2136).",
)
@click.option(
    "--tsig-key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="DNS-01: the TSIG key (BIND key file) that signs the updates.",
)
@click.option(
    "--dns-hook",
    metavar="CMD",
    help="DNS-01: a command run as 'CMD present|cleanup FQDN VALUE'.",
)
@click.option(
    "--deploy-hook",
    metavar="CMD",
    help="A command run after each new certificate, with UNITCERT_KEY_PATH, "
    "UNITCERT_CHAIN_PATH and UNITCERT_DOMAINS set.",
)
@click.option(
    "--production",
    is_flag=True,
    help="Allow a production CA (publicly trusted, strict rate limits).",
)
@click.option(
    "--off", is_flag=True, help="Serve the unit's own identity again; keep the account."
)
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=120.0,
    show_default=True,
    help="Seconds to wait for the running 'serve' to finish the order.",
)
@click.pass_context
def acme_command(
    ctx: click.Context,
    state_dir: Path,
    directory: str | None,
    domains: tuple[str, ...],
    email: str | None,
    challenge: str,
    profile: str | None,
    ca_bundle: Path | None,
    dns_server: str | None,
    tsig_key_file: Path | None,
    dns_hook: str | None,
    deploy_hook: str | None,
    production: bool,
    off: bool,
    wait: float,
) -> None:
    """Get and renew a browser-trusted certificate from an ACME CA.

    With --directory and --domain: save the settings and order now; the
    running 'unitcert device serve' orders, serves the certificate and keeps
    it renewed. With --off: go back to the unit's own identity. With neither:
    show the settings and the ACME status.

    Exit codes: 0 done (or saved for the next start of 'serve'), 1 the order
    failed or was not sent, 75 'serve' is still working on it after --wait.
    """
    store = StateStore(state_dir)
    device.load_unit(store)
    if off:
        if directory or domains:
            raise InputError("--off takes no other ACME settings: give it alone")
        agent.turn_off(store)
        unit = device.load_unit(store)
        click.echo(
            f"ACME is off; the unit serves its own identity ({unit.info.code}). "
            "The account key is kept for the next time."
        )
        return
    if not domains:
        if directory is not None:
            raise InputError("no --domain given: name at least one DNS name or IP")
        echo_status(store)
        return

    settings, bundle, tsig = _settings_from_options(
        store,
        directory=directory,
        domains=domains,
        email=email,
        challenge=challenge,
        profile=profile,
        dns_server=dns_server,
        tsig_key_file=tsig_key_file,
        dns_hook=dns_hook,
        deploy_hook=deploy_hook,
        production=production,
        ca_bundle=ca_bundle,
    )
    private = [i for i in settings.identifiers if is_ip(i) and not _public_ip(i)]
    if private:
        click.echo(
            f"Warning: {', '.join(private)} is not a public address; a public CA "
            "will refuse it.",
            err=True,
        )
    request = agent.save_settings(store, settings, ca_bundle=bundle, tsig_key=tsig)
    if not agent.serve_running(store):
        click.echo(
            f"Saved the ACME settings for {', '.join(settings.identifiers)}. No "
            f"'unitcert device serve' runs for {state_dir}: the unit orders its "
            "certificate when it starts."
        )
        return
    click.echo(f"Saved; 'serve' is ordering a certificate from {settings.directory}")
    outcome = _wait_for(store, request.id, wait)
    if outcome is None:
        click.echo(
            f"'serve' has not finished within {wait:g} s; it goes on in the "
            f"background: see 'unitcert device acme --state {state_dir}'."
        )
        ctx.exit(_EXIT_STILL_RUNNING)
    if outcome.ok:
        unit = device.load_unit(store)
        click.echo(f"Done: {outcome.message}.")
        _field("Serving", device.describe_source(unit.source))
        _field("Code", unit.info.code)
        return
    click.echo(f"Failed: {outcome.message}.", err=True)
    ctx.exit(1)


def _public_ip(value: str) -> bool:
    return ipaddress.ip_address(value).is_global


device_commands = [acme_command]
