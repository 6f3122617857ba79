"""``unitcert``: one command line over the unit agent, the factory and the audit.

Errors reach the user as one sentence on stderr and an exit code; tracebacks
only with ``-v``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO, TypeVar

import click

import unitcert.device as agent
from unitcert import __version__, keys
from unitcert.errors import CodeFormatError, ConnectError, InputError, UnitcertError
from unitcert.store import Part, StateStore

__all__ = ["DEFAULT_STATE", "main", "run", "state_option"]

logger = logging.getLogger("unitcert")

DEFAULT_STATE = Path("/var/lib/unitcert")
# Exit codes of errors, in one place. Any other failure, including an OS error
# on a file or directory the user named, exits 1; usage errors (a missing
# option, an unknown one, a bad value) exit 2 by click's convention. `verify`
# adds its outcomes as results: 1 not your device, 4 the chain or name check
# against --ca failed or the --ca file is unusable.
_ERROR_EXIT_CODES: tuple[tuple[type[UnitcertError], int], ...] = (
    (CodeFormatError, 2),
    (ConnectError, 3),
)
_INTERNAL_ERROR_EXIT = 70
# How many -v were given, before and after the command names (Context.meta is
# shared by a context and all of its children).
_VERBOSE_KEY = "unitcert.verbose"

F = TypeVar("F", bound=Callable[..., Any])


def state_option(function: F) -> F:
    """The ``--state DIR`` option of every command that runs on a unit."""
    return click.option(
        "--state",
        "state_dir",
        type=click.Path(path_type=Path, file_okay=False),
        default=DEFAULT_STATE,
        show_default=True,
        help="The unit's state directory.",
    )(function)


def _entropy_option(function: F) -> F:
    return click.option(
        "--entropy-timeout",
        type=click.FloatRange(min=0),
        default=keys.DEFAULT_ENTROPY_TIMEOUT,
        show_default=True,
        help="Seconds to wait for the kernel's random pool before giving up.",
    )(function)


def _refuse_empty_serial(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> str | None:
    # None means "not given" (a random serial); an empty value is a mistake.
    if value is not None and not value.strip():
        raise click.BadParameter(
            "the serial is empty: give the unit's serial, or leave out --serial "
            "for a random one",
            ctx=ctx,
            param=param,
        )
    return value


def _identity_options(function: F) -> F:
    options = [
        click.option(
            "--serial",
            callback=_refuse_empty_serial,
            help="The unit's serial (a DNS label); random when not given.",
        ),
        click.option(
            "--product",
            default=agent.DEFAULT_PRODUCT,
            show_default=True,
            help="The product name (a DNS label).",
        ),
        click.option(
            "--domain",
            default=agent.DEFAULT_DOMAIN,
            show_default=True,
            help="The maker's domain: the unit is <serial>.<product>.<domain>.",
        ),
        click.option(
            "--key-type",
            type=click.Choice([t.value for t in keys.KeyType]),
            default=keys.KeyType.P256.value,
            show_default=True,
            help="The identity key's type.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes each record to ``sys.stderr`` as it is at that moment.

    A handler bound to the stream of its creation keeps writing to it after
    the stream is swapped or closed (as an embedding program or pytest does).
    """

    def emit(self, record: logging.LogRecord) -> None:
        """Write ``record`` to the current ``sys.stderr``."""
        self.stream = sys.stderr
        super().emit(record)


def _configure_logging(verbose: int, *, level: int) -> None:
    handler = _StderrHandler(sys.stderr)
    if verbose:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    else:
        handler.setFormatter(logging.Formatter("unitcert: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else level)


def _verbose(ctx: click.Context) -> int:
    return int(ctx.meta.get(_VERBOSE_KEY, 0))


def _count_verbose(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value:
        ctx.meta[_VERBOSE_KEY] = _verbose(ctx) + value
        _configure_logging(_verbose(ctx), level=logging.WARNING)
    return value


def _accept_verbose(command: click.Command) -> None:
    """Let ``-v``/``--verbose`` follow the command's name too (``device status -v``).

    Commands of other parts get the option when they are registered, and so do
    the commands of a plain group of theirs.
    """
    if not any({"-v", "--verbose"} & set(param.opts) for param in command.params):
        command.params.append(
            click.Option(
                ["-v", "--verbose"],
                count=True,
                expose_value=False,
                callback=_count_verbose,
                help="Show debug logs and tracebacks (also accepted before the "
                "command).",
            )
        )
    if isinstance(command, click.Group) and not isinstance(command, LazyGroup):
        for subcommand in command.commands.values():
            _accept_verbose(subcommand)


class LazyGroup(click.Group):
    """A command group whose commands from other parts are imported on first use.

    Attributes:
        lazy_commands: command name to ``"module:attribute"`` of its
            ``click.Command``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands: dict[str, str] = {}

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        """Register ``cmd`` (and accept ``-v`` after its name)."""
        _accept_verbose(cmd)
        super().add_command(cmd, name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        """List the group's own commands and the lazy ones, sorted."""
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Return the command, importing its module the first time it is used."""
        if cmd_name in self.lazy_commands and cmd_name not in self.commands:
            module_name, attribute = self.lazy_commands[cmd_name].split(":")
            command = getattr(importlib.import_module(module_name), attribute)
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="Show debug logs and tracebacks (also accepted after the command).",
)
@click.version_option(__version__, prog_name="unitcert")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """unitcert: a unique TLS identity for every unit a maker ships.

    Run 'unitcert COMMAND --help' for the options of a command.
    """
    ctx.meta[_VERBOSE_KEY] = verbose
    _configure_logging(verbose, level=logging.WARNING)


@main.group(cls=LazyGroup)
def device() -> None:
    """Commands that run on the unit: first boot, serving, status, reset."""


def _echo_field(name: str, value: object) -> None:
    click.echo(f"  {name + ':':<12}{value}")


def _echo_setup_credential(unit: agent.Unit) -> None:
    if unit.admin is not None and unit.admin.must_change:
        _echo_field(
            "Setup",
            f"{unit.admin.setup}  (one-time credential: the first login asks "
            "for a new password)",
        )


@device.command("init")
@state_option
@_identity_options
@_entropy_option
def device_init(
    state_dir: Path,
    serial: str | None,
    product: str,
    domain: str,
    key_type: str,
    entropy_timeout: float,
) -> None:
    """First boot: make the unit's key and identity (nothing happens if it has one)."""
    result = agent.init_unit(
        StateStore(state_dir),
        serial=serial,
        product=product,
        domain=domain,
        key_type=keys.KeyType.parse(key_type),
        entropy_timeout=entropy_timeout,
    )
    if result.created:
        click.echo(f"Made a new identity in {state_dir}:")
    else:
        click.echo(
            f"The unit in {state_dir} already has its identity; nothing changed:"
        )
    unit = result.unit
    _echo_field("Host name", unit.meta.hostname)
    _echo_field("Key", unit.info.key_type)
    _echo_field("Code", unit.info.code)
    _echo_setup_credential(unit)


@device.command("serve")
@state_option
@click.option(
    "--bind", default="127.0.0.1", show_default=True, help="Address to listen on."
)
@click.option(
    "--https-port", type=click.IntRange(1, 65535), default=8443, show_default=True
)
@click.option(
    "--http-port",
    type=click.IntRange(1, 65535),
    default=8080,
    show_default=True,
    help="Plain HTTP port; it redirects to HTTPS.",
)
@_identity_options
@_entropy_option
@click.pass_context
def device_serve(
    ctx: click.Context,
    state_dir: Path,
    bind: str,
    https_port: int,
    http_port: int,
    serial: str | None,
    product: str,
    domain: str,
    key_type: str,
    entropy_timeout: float,
) -> None:
    """Serve the unit's admin pages over HTTPS with its own identity.

    On the first start this makes the identity (as 'device init' does, with
    the identity options); later starts reuse it. A new state generation
    (from 'device reset', or any command that changes the state) is served
    within a second, or at once on SIGHUP, without a restart.
    """
    from unitcert.web import run_server

    _configure_logging(_verbose(ctx), level=logging.INFO)
    store = StateStore(state_dir)
    store.create()
    # One serving process per state: a second one would race the first.
    with store.serving():
        result = agent.start_unit(
            store,
            entropy_timeout=entropy_timeout,
            serial=serial,
            product=product,
            domain=domain,
            key_type=keys.KeyType.parse(key_type),
        )
        unit = result.unit
        for note in result.notes:
            logger.info("%s", note)

        host = f"[{bind}]" if ":" in bind else bind

        def announce() -> None:
            if result.created:
                click.echo(f"First start: made this unit's identity in {state_dir}.")
            else:
                click.echo(f"Reusing this unit's identity from {state_dir}.")
            _echo_field("URL", f"https://{host}:{https_port}/")
            _echo_field("Host name", unit.meta.hostname)
            _echo_field(
                "Code",
                f"{unit.info.code}  (check it: unitcert verify {host}:{https_port} "
                f"--code {unit.info.code})",
            )
            _echo_setup_credential(unit)
            click.echo("Press Ctrl+C to stop.", err=False)

        run_server(
            store,
            bind=bind,
            https_port=https_port,
            http_port=http_port,
            on_listening=announce,
        )


def _status_record(unit: agent.Unit, store: StateStore) -> dict[str, object]:
    record: dict[str, object] = {
        "state": str(store.root),
        "source": unit.source,
        "source_name": agent.describe_source(unit.source),
        "hostname": unit.meta.hostname,
        "serial": unit.meta.serial,
        "product": unit.meta.product,
        "names": list(unit.info.names),
        "subject": unit.info.subject,
        "issuer": unit.info.issuer,
        "not_before": unit.info.not_before.isoformat(),
        "not_after": unit.info.not_after.isoformat(),
        "key_type": unit.info.key_type,
        "key_location": f"file:{unit.key_path}",
        "code": str(unit.info.code),
        "spki_pin": f"sha256//{unit.info.pin}",
        "generation": unit.generation,
        "binding": {
            "kind": unit.meta.binding.kind,
            "value": unit.meta.binding.value,
            "matches_this_machine": unit.binding_ok,
        },
        "admin_password_set": unit.admin is not None and not unit.admin.must_change,
        "chosen_source": unit.chosen,
        "identity_code": str(unit.identity_info.code) if unit.identity_info else None,
        "note": unit.served_note,
    }
    # The setup credential is for the local operator only (DESIGN.md); it is
    # None once the owner has chosen a password.
    setup = unit.admin.setup if unit.admin is not None else None
    record["setup_credential"] = setup if os.geteuid() == 0 else None
    return record


@device.command("status")
@state_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def device_status(state_dir: Path, as_json: bool) -> None:
    """Show what the unit serves: source, names, validity, key, code, pin."""
    store = StateStore(state_dir)
    unit = agent.load_unit(store)
    record = _status_record(unit, store)
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    click.echo(f"Unit {unit.meta.hostname} ({store.root})")
    _echo_field("Source", agent.describe_source(unit.source))
    _echo_field("Names", ", ".join(unit.info.names))
    _echo_field(
        "Valid",
        f"{unit.info.not_before:%Y-%m-%d %H:%M} to "
        f"{unit.info.not_after:%Y-%m-%d %H:%M} UTC",
    )
    _echo_field("Key", f"{unit.info.key_type} ({record['key_location']})")
    _echo_field("Code", unit.info.code)
    if unit.identity_info is not None and unit.identity_info.code != unit.info.code:
        _echo_field("Sticker", f"{unit.identity_info.code} (the unit's own identity)")
    _echo_field("SPKI pin", record["spki_pin"])
    _echo_field("Generation", unit.generation)
    if unit.served_note:
        _echo_field("Note", unit.served_note)
    binding = "this machine" if unit.binding_ok else "ANOTHER MACHINE (cloned image?)"
    _echo_field("Bound to", f"{unit.meta.binding.describe()}: {binding}")
    if unit.admin is None:
        _echo_field(
            "Setup",
            "the unit has no admin credential yet: starting it ('unitcert device "
            f"serve --state {store.root}') makes a setup credential",
        )
    elif record["setup_credential"] is not None:
        _echo_setup_credential(unit)
    elif unit.admin.must_change:
        _echo_field("Setup", "a setup credential is set; run as root to see it")
    else:
        _echo_field("Admin", "the owner has set a password")


@device.command("reset")
@state_option
@click.option("--yes", is_flag=True, help="Confirm: wipe the owner's settings.")
@click.option(
    "--regenerate-identity",
    is_flag=True,
    help="Also make a new identity key, even for a factory-provisioned unit.",
)
@_entropy_option
def device_reset(
    state_dir: Path, yes: bool, regenerate_identity: bool, entropy_timeout: float
) -> None:
    """Factory reset: wipe the owner's settings and certificates.

    A unit that was never factory-provisioned also gets a new identity key; a
    factory identity survives unless --regenerate-identity is given.
    """
    if not yes:
        raise InputError(
            "a factory reset wipes the owner's password, settings and certificates: "
            "add --yes to do it"
        )
    result = agent.reset_unit(
        StateStore(state_dir),
        regenerate_identity=regenerate_identity,
        entropy_timeout=entropy_timeout,
    )
    click.echo(f"Reset the unit in {state_dir}:")
    for note in result.notes:
        click.echo(f"  - {note}")
    _echo_field("Code", result.unit.info.code)
    _echo_setup_credential(result.unit)


@main.command("code")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
def code_command(file: Path) -> None:
    """Print the fingerprint code of a certificate, public key or CSR (PEM or DER)."""
    from unitcert.code import code_for_spki
    from unitcert.spki import load_spki_source

    source = load_spki_source(file)
    if source.certificates > 1:
        click.echo(
            f"the file holds {source.certificates} certificates; this is the code "
            "of the first",
            err=True,
        )
    click.echo(str(code_for_spki(source.spki_der)))


def _check_name_option(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> str | None:
    from unitcert.verify import check_server_name

    if value is None:
        return None
    try:
        return check_server_name(value)
    except InputError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@main.command("verify")
@click.argument("address", metavar="HOST[:PORT]")
@click.option("--code", "code_text", required=True, help="The code from the sticker.")
@click.option(
    "--name",
    "--servername",
    "name",
    callback=_check_name_option,
    help="The unit's DNS name: sent as SNI and, with --ca, checked in its "
    "certificate (default: the HOST connected to).",
)
@click.option(
    "--ca",
    "ca_path",
    type=click.Path(path_type=Path),
    help="The maker's root certificate (PEM or DER): also check the chain to it.",
)
@click.option(
    "--timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True
)
@click.pass_context
def verify_command(
    ctx: click.Context,
    address: str,
    code_text: str,
    name: str | None,
    ca_path: Path | None,
    timeout: float,
) -> None:
    """Check that the unit at HOST[:PORT] serves the key of the code on its sticker.

    HOST[:PORT] may also be the URL that 'device serve' prints
    (https://HOST:PORT/); the port defaults to 443, and an IPv6 address with a
    port goes in brackets: [fe80::1]:8443. The code and the --ca file are
    checked before anything is sent.

    \b
    Exit codes:
      0  the unit serves the key of the code
      1  a valid code of ANOTHER key: this is not your device
      2  the code is malformed or mistyped, or the command line is wrong
         (a missing --code, an unknown option, an invalid --name)
      3  cannot connect, no TLS there, or the address is unusable
      4  the chain or name check against --ca failed, or the --ca file is
         unusable
    """
    from unitcert.code import parse_code
    from unitcert.verify import Outcome, load_roots, verify_unit

    expected = parse_code(code_text.strip())
    roots = None
    if ca_path is not None:
        try:
            roots = load_roots(ca_path)
        except InputError as exc:
            logger.debug("error details", exc_info=True)
            click.echo(f"unitcert: error: {exc}", err=True)
            ctx.exit(Outcome.UNTRUSTED.value)
    result = verify_unit(
        address, expected, servername=name, roots=roots, timeout=timeout
    )

    if result.outcome is Outcome.MISMATCH:
        click.echo(
            f"NOT YOUR DEVICE: {result.address} serves a key with code "
            f"{result.served}, not {result.expected}. Do not log in or enter any "
            "password: this is not the unit the sticker belongs to.",
            err=True,
        )
    elif result.outcome is Outcome.UNTRUSTED:
        hint = (
            "; if the unit has a DNS name, give it with --name <the unit's DNS name>"
            if name is None and result.name_mismatch
            else ""
        )
        click.echo(
            f"The code matches ({result.served}), but the certificate did not "
            f"verify against {ca_path} for the name {result.checked_name}: "
            f"{result.trust_error}{hint}.",
            err=True,
        )
    else:
        trusted = (
            f", and its certificate verifies to {ca_path} for the name "
            f"{result.checked_name}"
            if ca_path
            else ""
        )
        click.echo(
            f"OK: {result.address} is the unit with code {result.served}{trusted}."
        )
    ctx.exit(result.outcome.value)


@main.command("label")
@state_option
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="The label file: FILE.png or FILE.pdf (62 mm x 29 mm).",
)
def label_command(state_dir: Path, output: Path) -> None:
    """Print the unit's sticker: product, serial, host name, code and QR."""
    from unitcert.label import Label, write_label

    store = StateStore(state_dir)
    unit = agent.load_unit(store)
    identity = store.current(Part.IDENTITY)
    printed = (
        identity.read("setup-credential").decode("utf-8").strip()
        if identity is not None and identity.has("setup-credential")
        else None
    )
    write_label(Label.for_unit(unit, setup_credential=printed), output)
    click.echo(
        f"Wrote the label for {unit.meta.hostname} ({unit.info.code}) to {output}"
    )


# Commands of other parts register here: name -> "module:attribute". They are
# imported only when used, so that a unit's `serve` and `status` never pay for
# the factory's database or the audit's number crunching.
_PART_COMMANDS: dict[str, str] = {
    "factory": "unitcert.factory.cli:factory",
    "audit": "unitcert.audit.cli:audit",
}
_DEVICE_PART_COMMANDS: dict[str, str] = {
    "csr": "unitcert.factory.cli:csr_command",
    "install-identity": "unitcert.factory.cli:install_identity_command",
    "import": "unitcert.custom.cli:import_command",
    "use": "unitcert.custom.cli:use_command",
    "revert": "unitcert.custom.cli:revert_command",
    "acme": "unitcert.acme.cli:acme_command",
}
for _group, _table in ((main, _PART_COMMANDS), (device, _DEVICE_PART_COMMANDS)):
    assert isinstance(_group, LazyGroup)
    _group.lazy_commands.update(_table)


def _exit_code_for(error: UnitcertError) -> int:
    for kind, code in _ERROR_EXIT_CODES:
        if isinstance(error, kind):
            return code
    return 1


def run(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit code (no traceback for errors)."""
    try:
        result = main.main(args=argv, prog_name="unitcert", standalone_mode=False)
    except click.exceptions.Exit as done:
        return int(done.exit_code)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 1
    except UnitcertError as exc:
        logger.debug("error details", exc_info=True)
        click.echo(f"unitcert: error: {exc}", err=True)
        return _exit_code_for(exc)
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        # An ordinary refusal by the OS (a read-only or special path, a file
        # where a directory should be, a name too long): the user's to fix.
        logger.debug("error details", exc_info=True)
        reason = exc.strerror or str(exc)
        if exc.filename is not None:
            reason = f"cannot use {os.fsdecode(exc.filename)}: {reason}"
        click.echo(f"unitcert: error: {reason}", err=True)
        return 1
    except Exception as exc:
        logger.debug("internal error", exc_info=True)
        click.echo(
            f"unitcert: internal error: {type(exc).__name__}: {exc} (run with -v for "
            "details, and please report it)",
            err=True,
        )
        return _INTERNAL_ERROR_EXIT
    return int(result or 0)


def entry_point() -> None:
    """The ``unitcert`` console script."""
    sys.exit(run())
