"""``unitcert device import``, ``use`` and ``revert``, and the custom CSR.

``device csr --custom`` belongs to the factory part's ``csr`` command, which
calls :func:`custom_csr` here.
"""

from __future__ import annotations

from pathlib import Path

import click

from unitcert import device, keys
from unitcert.cli import state_option
from unitcert.custom.bundle import read_input_file, read_password_file
from unitcert.custom.check import Candidate
from unitcert.custom.install import (
    IDENTITY_CHOICES,
    install_custom,
    make_custom_csr,
    prepare_import,
    revert_choice,
    use_source,
)
from unitcert.store import StateStore

__all__ = ["custom_csr", "device_commands", "echo_candidate"]


def _field(name: str, value: object) -> None:
    click.echo(f"  {name + ':':<12}{value}")


def echo_candidate(candidate: Candidate, *, name_warning: bool = True) -> None:
    """Print what was found in the files, as the admin page shows it.

    ``name_warning`` False leaves out the warning about the unit's names, for
    when the error that follows says it.
    """
    info = candidate.info
    click.echo(f"Found in {', '.join(candidate.files)}:")
    _field("Subject", info.subject)
    _field("Names", ", ".join(info.names))
    for index, entry in enumerate(candidate.entries):
        line = f"{entry.name} ({entry.role})"
        if index == 0:
            _field("Chain", line)
        else:
            click.echo(f"  {'':<12}<- {line}")
    _field(
        "Valid",
        f"{info.not_before:%Y-%m-%d %H:%M} to {info.not_after:%Y-%m-%d %H:%M} UTC",
    )
    key_from = {
        "file": "given with the certificate",
        "pending": "made on this unit by 'device csr --custom'",
        "installed": "the key of the custom certificate in force",
    }[candidate.key_origin]
    _field("Key", f"{info.key_type} ({key_from})")
    _field("Code", info.code)
    for warning in candidate.warnings:
        click.echo(f"Warning: {warning}", err=True)
    if candidate.name_warning and name_warning:
        text = candidate.name_warning
        click.echo(f"Warning: {text[:1].upper()}{text[1:]}.", err=True)


@click.command("import")
@state_option
@click.argument(
    "files",
    nargs=-1,
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
)
@click.option(
    "--key",
    "key_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The private key, when it is not in FILE (PEM or DER, maybe encrypted).",
)
@click.option(
    "--password-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A file whose first line is the password of the key or PKCS#12 file.",
)
@click.option(
    "--ca-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Your CA's root certificate: the chain must lead to it.",
)
@click.option("--dry-run", is_flag=True, help="Check and show; change nothing.")
@click.option(
    "--force",
    is_flag=True,
    help="Install even though the certificate names none of the unit's names.",
)
def import_command(
    state_dir: Path,
    files: tuple[Path, ...],
    key_file: Path | None,
    password_file: Path | None,
    ca_file: Path | None,
    dry_run: bool,
    force: bool,
) -> None:
    """Install your own certificate (PEM, DER, PKCS#7 or PKCS#12) and serve it.

    FILE may hold the certificate, its chain in any order (even the root) and
    the key. A certificate given alone is matched to the key made by
    'unitcert device csr --custom'. Nothing changes unless every check
    passes; 'unitcert device serve' serves it within a second.
    """
    store = StateStore(state_dir)
    inputs = [read_input_file(path) for path in files]
    if key_file is not None:
        inputs.append(read_input_file(key_file))
    password = read_password_file(password_file) if password_file else None
    ca_inputs = [read_input_file(ca_file)] if ca_file is not None else []
    candidate = prepare_import(store, inputs, password=password, ca_files=ca_inputs)
    echo_candidate(candidate, name_warning=dry_run or force)
    if dry_run:
        click.echo("Dry run: nothing was changed.")
        return
    unit = install_custom(store, candidate, force=force)
    click.echo(
        f"Installed it as the unit's custom certificate (state generation "
        f"{unit.generation}); the running unit serves it within a second."
    )
    if unit.identity_info is not None:
        click.echo(
            f"The sticker code {unit.identity_info.code} stays the unit's own; "
            f"browsers now see the code {candidate.info.code}."
        )
    if unit.served_note:
        click.echo(f"Note: {unit.served_note}.")


@click.command("use")
@state_option
@click.argument(
    "source",
    type=click.Choice([*IDENTITY_CHOICES, *device.LOCAL_SOURCES]),
)
def use_command(state_dir: Path, source: str) -> None:
    """Choose what the unit serves: self|factory (its own identity), acme, custom."""
    change = use_source(StateStore(state_dir), source)
    click.echo(change.message)


@click.command("revert")
@state_option
def revert_command(state_dir: Path) -> None:
    """Go back to the certificate the unit served before the last change.

    Only the choice of certificate and the custom certificate go back; the
    admin password stays as it is.
    """
    change = revert_choice(StateStore(state_dir))
    click.echo(change.message)


def custom_csr(store: StateStore, names: tuple[str, ...], key_type: str) -> bytes:
    """Make the pending key and the CSR for ``device csr --custom``; return the CSR.

    Raises:
        The errors of :func:`unitcert.custom.install.make_custom_csr`.
    """
    csr = make_custom_csr(store, names, key_type=keys.KeyType.parse(key_type))
    click.echo(
        "Made a new key on the unit for this CSR. Have your CA sign it, then run "
        "'unitcert device import CERT.pem' with the certificate alone.",
        err=True,
    )
    return csr


device_commands: list[click.Command] = [import_command, use_command, revert_command]
