"""``unitcert factory ...`` and the two ``unitcert device`` commands of this part.

The CA passphrase comes from ``--passphrase-file F``, else the environment
variable ``UNITCERT_CA_PASSPHRASE``, else a prompt: never from an argument,
which other users could read in the process list.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
from cryptography.hazmat.primitives import serialization

from unitcert import keys
from unitcert.cli import state_option
from unitcert.errors import InputError
from unitcert.factory import ca as factory_ca
from unitcert.factory.issue import REVOCATION_REASONS, Issuer
from unitcert.factory.registry import Registry, default_url
from unitcert.store import StateStore, write_output_file

__all__ = ["device_commands", "factory"]

F = TypeVar("F", bound=Callable[..., Any])


def _dir_option(function: F) -> F:
    return click.option(
        "--dir",
        "directory",
        type=click.Path(path_type=Path, file_okay=False),
        required=True,
        help="The factory directory (CA certificates, encrypted keys, registry).",
    )(function)


def _db_option(function: F) -> F:
    return click.option(
        "--db",
        "db_url",
        envvar="UNITCERT_DB",
        help="The registry's database URL (default: SQLite at DIR/registry.db), "
        "e.g. postgresql+psycopg://user@host/db.",
    )(function)


def _passphrase_option(function: F) -> F:
    return click.option(
        "--passphrase-file",
        type=click.Path(path_type=Path, dir_okay=False),
        help=f"A file holding the CA passphrase (else ${factory_ca.CA_KEY_ENV}, "
        "else a prompt).",
    )(function)


def _validity_option(function: F) -> F:
    return click.option(
        "--days",
        "validity_days",
        type=int,
        help="Validity of the unit certificate in days (at most 825; default: the "
        "factory's).",
    )(function)


def _passphrase(path: Path | None, *, confirm: bool = False) -> bytes:
    if path is not None:
        return factory_ca.read_passphrase_file(path)
    from_env = os.environ.get(factory_ca.CA_KEY_ENV)
    if from_env:
        return from_env.encode("utf-8")
    entered = click.prompt(
        "CA passphrase", hide_input=True, confirmation_prompt=confirm, err=True
    )
    return str(entered).encode("utf-8")


def _registry_url(directory: Path, db_url: str | None, kind: str) -> str:
    if db_url is None and kind != "sqlite":
        raise InputError(
            f"the factory in {directory} keeps its registry in {kind}: pass its URL "
            "with --db or UNITCERT_DB"
        )
    return db_url or default_url(directory)


@contextmanager
def _issuer(
    directory: Path, db_url: str | None, passphrase_file: Path | None
) -> Iterator[Issuer]:
    ca = factory_ca.load_factory(directory, _passphrase(passphrase_file))
    with Registry(_registry_url(directory, db_url, ca.config.registry)) as registry:
        yield Issuer(ca, registry)


def _check_writable(path: Path) -> None:
    """Refuse, before anything is issued, an output that cannot be written.

    A certificate is registered when it is issued: failing to write it after
    that would leave an issued certificate that nobody received.

    Raises:
        InputError: the folder does not exist, or the path is a folder.
    """
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InputError(f"{path} is a folder: give a file name to write to")
    if not parent.is_dir():
        raise InputError(
            f"cannot write {path}: the folder {parent} does not exist; create it "
            "first, nothing was issued"
        )
    if not os.access(parent, os.W_OK):
        raise InputError(
            f"cannot write {path}: the folder {parent} is not writable; nothing "
            "was issued"
        )


def _write_output(path: Path, data: bytes) -> None:
    try:
        write_output_file(path, data, mode=0o644)
    except OSError as error:
        raise InputError(
            f"cannot write {path} ({error.strerror}): choose a writable place"
        ) from error


@click.group()
def factory() -> None:
    """The maker's side: CA, issuing, provisioning, revocation, registry."""


@factory.command("init")
@_dir_option
@click.option("--domain", required=True, help="The maker's domain, e.g. example.com.")
@click.option("--product", required=True, help="The product name, e.g. router.")
@click.option(
    "--root-key-type",
    type=click.Choice(["p384", "p256"]),
    default="p384",
    show_default=True,
)
@click.option(
    "--issuing-key-type",
    type=click.Choice(["p256", "p384"]),
    default="p256",
    show_default=True,
)
@click.option(
    "--days",
    "validity_days",
    type=int,
    default=factory_ca.DEFAULT_VALIDITY_DAYS,
    show_default=True,
    help="Default validity of unit certificates (at most 825).",
)
@_db_option
@_passphrase_option
def init_command(
    directory: Path,
    domain: str,
    product: str,
    root_key_type: str,
    issuing_key_type: str,
    validity_days: int,
    db_url: str | None,
    passphrase_file: Path | None,
) -> None:
    """Create an offline root CA and a name-constrained issuing CA under it."""
    if (directory / factory_ca.CONFIG_FILE).exists():
        raise InputError(f"{directory} already holds a factory: nothing was changed")
    passphrase = _passphrase(passphrase_file, confirm=True)
    # A PostgreSQL registry is reached before anything is written; SQLite's
    # file goes into the factory directory, which init_factory makes.
    registry = Registry(db_url, create=True) if db_url else None
    ca = factory_ca.init_factory(
        directory,
        domain=domain,
        product=product,
        passphrase=passphrase,
        root_key_type=keys.KeyType.parse(root_key_type),
        issuing_key_type=keys.KeyType.parse(issuing_key_type),
        validity_days=validity_days,
        registry=registry.dialect if registry else "sqlite",
    )
    registry = registry or Registry(default_url(directory), create=True)
    registry.close()
    click.echo(f"Created the factory CA for *.{ca.config.subtree} in {directory}:")
    click.echo(f"  Root:     {directory / factory_ca.ROOT_CERT}  (give to customers)")
    click.echo(f"  Issuing:  {directory / factory_ca.ISSUING_CERT}")
    click.echo(f"  Registry: {registry.display_url}")
    click.echo(
        f"Move {directory / factory_ca.ROOT_KEY} offline: only a new issuing CA "
        "needs it."
    )


@factory.command("issue")
@_dir_option
@click.option(
    "--csr",
    "csr_path",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="The unit's CSR (from 'unitcert device csr').",
)
@click.option("--serial", required=True, help="The unit's serial.")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Where to write the chain (unit certificate, then issuing CA), PEM.",
)
@click.option("--reissue", is_flag=True, help="Allow a serial that was already issued.")
@_validity_option
@_db_option
@_passphrase_option
def issue_command(
    directory: Path,
    csr_path: Path,
    serial: str,
    output: Path,
    reissue: bool,
    validity_days: int | None,
    db_url: str | None,
    passphrase_file: Path | None,
) -> None:
    """Check a unit's CSR, sign it, register the unit and write its chain."""
    _check_writable(output)
    try:
        csr = csr_path.read_bytes()
    except OSError as error:
        raise InputError(f"cannot read the CSR {csr_path}: {error.strerror}") from error
    with _issuer(directory, db_url, passphrase_file) as issuer:
        issued = issuer.issue(csr, serial, reissue=reissue, validity_days=validity_days)
    _write_output(output, issued.chain_pem)
    click.echo(f"Issued {issued.hostname} ({issued.code}); chain in {output}")


@factory.command("reissue")
@_dir_option
@click.option("--serial", required=True, help="The unit's serial.")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Where to write the new chain (default: <serial>.chain.pem).",
)
@_validity_option
@_db_option
@_passphrase_option
def reissue_command(
    directory: Path,
    serial: str,
    output: Path | None,
    validity_days: int | None,
    db_url: str | None,
    passphrase_file: Path | None,
) -> None:
    """Renew a unit's certificate for the same key."""
    if output is not None:
        _check_writable(output)
    with _issuer(directory, db_url, passphrase_file) as issuer:
        issued = issuer.reissue(serial, validity_days=validity_days)
    output = output or Path(f"{issued.serial}.chain.pem")
    _write_output(output, issued.chain_pem)
    click.echo(f"Re-issued {issued.hostname} ({issued.code}); chain in {output}")


@factory.command("provision")
@_dir_option
@click.option(
    "--state",
    "state_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The unit's state directory, as the station reaches it.",
)
@click.option("--serial", required=True, help="The unit's serial.")
@click.option(
    "--label",
    "label_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the sticker: FILE.png or FILE.pdf (62 mm x 29 mm).",
)
@click.option(
    "--key-type",
    type=click.Choice([t.value for t in keys.KeyType]),
    default="p256",
    show_default=True,
)
@_validity_option
@_db_option
@_passphrase_option
def provision_command(
    directory: Path,
    state_dir: Path,
    serial: str,
    label_path: Path | None,
    key_type: str,
    validity_days: int | None,
    db_url: str | None,
    passphrase_file: Path | None,
) -> None:
    """One-step station flow: the unit's key and CSR, issue, install, label."""
    from unitcert.factory.provision import provision_unit

    if label_path is not None:
        _check_writable(label_path)
    with _issuer(directory, db_url, passphrase_file) as issuer:
        unit = provision_unit(
            issuer,
            state_dir,
            serial,
            key_type=keys.KeyType.parse(key_type),
            label_path=label_path,
            validity_days=validity_days,
        )
    click.echo(f"Provisioned {unit.hostname} in {state_dir}")
    click.echo(f"  Code:  {unit.code}")
    if label_path is not None:
        click.echo(f"  Label: {label_path}")


@factory.command("provision-batch")
@_dir_option
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Where the simulated units' state folders go (one per serial).",
)
@click.option("--count", type=click.IntRange(min=1), required=True)
@click.option("--serial-prefix", required=True, help="Serials are PREFIX0001, ...")
@click.option("--start", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--key-type",
    type=click.Choice([t.value for t in keys.KeyType]),
    default="p256",
    show_default=True,
)
@_validity_option
@_db_option
@_passphrase_option
def provision_batch_command(
    directory: Path,
    out_dir: Path,
    count: int,
    serial_prefix: str,
    start: int,
    key_type: str,
    validity_days: int | None,
    db_url: str | None,
    passphrase_file: Path | None,
) -> None:
    """Provision COUNT simulated units, for trials and benchmarks."""
    import time

    from rich.progress import Progress

    from unitcert.factory.provision import batch_serials, provision_batch

    serials = batch_serials(serial_prefix, count, start=start)
    began = time.perf_counter()
    with (
        _issuer(directory, db_url, passphrase_file) as issuer,
        Progress(transient=False) as progress,
    ):
        tasks = {
            "keys": progress.add_task("units make keys and CSRs", total=count),
            "issue": progress.add_task("CA checks, signs, registers", total=count),
            "install": progress.add_task("units install chains", total=count),
        }
        result = provision_batch(
            issuer,
            out_dir,
            serials,
            key_type=keys.KeyType.parse(key_type),
            validity_days=validity_days,
            on_progress=lambda phase, n: progress.advance(tasks[phase], n),
        )
    elapsed = time.perf_counter() - began
    done = len(result.provisioned)
    click.echo(
        f"Provisioned {done} units in {out_dir} in {elapsed:.1f} s "
        f"({done / elapsed:.0f} units/s)."
    )
    for serial, reason in result.refused:
        click.echo(f"Refused {serial}: {reason}", err=True)
    for serial in result.flagged:
        click.echo(
            f"Unit {serial}, issued earlier, has an RSA key that shares a prime "
            "with another unit's: revoke and re-key it",
            err=True,
        )
    if result.refused or result.flagged:
        raise click.exceptions.Exit(1)


@factory.command("revoke")
@_dir_option
@click.option("--serial", required=True, help="The unit's serial.")
@click.option(
    "--reason",
    type=click.Choice(list(REVOCATION_REASONS)),
    required=True,
    help="Why (RFC 5280 5.3.1).",
)
@_db_option
@_passphrase_option
def revoke_command(
    directory: Path,
    serial: str,
    reason: str,
    db_url: str | None,
    passphrase_file: Path | None,
) -> None:
    """Revoke every certificate of a unit; publish it with 'factory crl'."""
    with _issuer(directory, db_url, passphrase_file) as issuer:
        count = issuer.revoke(serial, reason)
    click.echo(
        f"Revoked unit {serial} ({reason}, {count} certificates); run 'unitcert "
        "factory crl' to publish it."
    )


@factory.command("crl")
@_dir_option
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Where to write the CRL, PEM.",
)
@click.option(
    "--next-update-days",
    type=click.IntRange(1, 366),
    default=7,
    show_default=True,
    help="Days until the next CRL is due.",
)
@_db_option
@_passphrase_option
def crl_command(
    directory: Path,
    output: Path,
    next_update_days: int,
    db_url: str | None,
    passphrase_file: Path | None,
) -> None:
    """Sign a CRL of the issuing CA with every revoked certificate."""
    with _issuer(directory, db_url, passphrase_file) as issuer:
        crl = issuer.crl(next_update_days=next_update_days)
    _write_output(output, crl.public_bytes(serialization.Encoding.PEM))
    click.echo(f"Wrote a CRL of {len(crl)} revoked certificates to {output}")


@factory.command("list")
@_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array.")
@_db_option
def list_command(directory: Path, as_json: bool, db_url: str | None) -> None:
    """Show what was issued (no passphrase needed)."""
    try:
        config = factory_ca.FactoryConfig.from_json(
            (directory / factory_ca.CONFIG_FILE).read_bytes()
        )
    except FileNotFoundError:
        raise InputError(f"{directory} holds no factory") from None
    with Registry(_registry_url(directory, db_url, config.registry)) as registry:
        units = registry.list_units()
    if as_json:
        records = [
            {
                "serial": u.serial,
                "hostname": u.hostname,
                "key_type": u.key_type,
                "spki_sha256": u.spki_sha256,
                "cert_serial": u.cert_serial,
                "issued_at": u.issued_at.isoformat(),
                "not_after": u.not_after.isoformat(),
                "status": u.status,
                "revocation_reason": u.revocation_reason,
                "prime_check": u.prime_check,
                "label_printed": u.label_printed,
            }
            for u in units
        ]
        click.echo(json.dumps(records, indent=2))
        return
    if not units:
        click.echo("No unit was issued yet.")
        return
    click.echo(f"{'SERIAL':<16} {'KEY':<12} {'ISSUED':<11} {'EXPIRES':<11} STATUS")
    for u in units:
        status = (
            u.status if u.status == "active" else f"{u.status} ({u.revocation_reason})"
        )
        if u.prime_check == "shared":
            status += ", SHARES A PRIME"
        click.echo(
            f"{u.serial:<16} {u.key_type:<12} {u.issued_at:%Y-%m-%d}  "
            f"{u.not_after:%Y-%m-%d}  {status}"
        )


@click.command("csr")
@state_option
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Where to write the CSR (default: standard output).",
)
@click.option(
    "--custom",
    is_flag=True,
    help="Make a new key for your own CA instead, and a CSR for the --name names; "
    "then 'device import' the certificate alone.",
)
@click.option("--name", "names", multiple=True, help="With --custom: a name (repeat).")
@click.option(
    "--key-type",
    type=click.Choice([t.value for t in keys.KeyType]),
    default=keys.KeyType.P256.value,
    show_default=True,
    help="With --custom: the new key's type.",
)
def csr_command(
    state_dir: Path,
    output: Path | None,
    custom: bool,
    names: tuple[str, ...],
    key_type: str,
) -> None:
    """Write the unit's CSR for its identity key and names (for 'factory issue').

    With --custom, make a new key for a certificate from your own CA instead.
    """
    from unitcert.factory.unit import make_identity_csr

    if names and not custom:
        raise InputError("--name is for a CSR to your own CA: add --custom")
    if custom:
        from unitcert.custom.cli import custom_csr

        csr = custom_csr(StateStore(state_dir), names, key_type)
    else:
        csr = make_identity_csr(StateStore(state_dir))
    if output is None:
        click.echo(csr.decode("ascii"), nl=False)
    else:
        _write_output(output, csr)
        click.echo(f"Wrote the CSR to {output}", err=True)


@click.command("install-identity")
@state_option
@click.argument("chain", type=click.Path(path_type=Path, dir_okay=False))
def install_identity_command(state_dir: Path, chain: Path) -> None:
    """Install the chain from 'factory issue' as the unit's factory identity."""
    from unitcert.factory.unit import install_factory_identity

    try:
        data = chain.read_bytes()
    except OSError as error:
        raise InputError(f"cannot read {chain}: {error.strerror}") from error
    unit = install_factory_identity(StateStore(state_dir), data)
    click.echo(f"Installed the factory identity of {unit.meta.hostname}")
    click.echo(f"  Code:   {unit.info.code}  (unchanged: the same key)")
    click.echo(f"  Issuer: {unit.info.issuer}")


device_commands: list[click.Command] = [csr_command, install_identity_command]
