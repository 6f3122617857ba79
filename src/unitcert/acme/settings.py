"""The owner's ACME settings: which CA, which names, how to prove them.

They live in the unit's local part as ``acme-settings.json``; a CA bundle and
a TSIG key given with them are copied beside it (``acme-ca-bundle.pem``,
``acme-tsig.key``), so that ``serve`` never depends on a file the owner may
move later. Everything here is checked without talking to the CA: only
``serve`` does that (DESIGN.md, "The unit's state").
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
import shlex
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509

from unitcert.errors import InputError, StateError

__all__ = [
    "CA_BUNDLE_FILE",
    "CHALLENGES",
    "PRODUCTION_DIRECTORIES",
    "SETTINGS_FILE",
    "TSIG_FILE",
    "AcmeSettings",
    "TsigKey",
    "check_ca_bundle",
    "check_hook",
    "check_identifier",
    "is_ip",
    "parse_dns_server",
    "parse_tsig_key",
    "read_small_file",
]

SETTINGS_FILE = "acme-settings.json"
CA_BUNDLE_FILE = "acme-ca-bundle.pem"
TSIG_FILE = "acme-tsig.key"
CHALLENGES = ("http-01", "dns-01")

# Directories that issue publicly trusted certificates: choosing one needs
# --production, so that a test setting never spends a real CA's rate limits.
PRODUCTION_DIRECTORIES = frozenset(
    {
        "https://acme-v02.api.letsencrypt.org/directory",
        "https://acme.zerossl.com/v2/DV90",
        "https://dv.acme-v02.api.pki.goog/directory",
        "https://api.buypass.com/acme/directory",
    }
)

_DNS_LABEL_RE = re.compile(r"^[a-z0-9_]([a-z0-9-]{0,61}[a-z0-9])?$")
_TSIG_RE = re.compile(
    r'key\s+"?(?P<name>[A-Za-z0-9._-]+)"?\s*\{(?P<body>[^}]*)\}', re.DOTALL
)
_TSIG_FIELD_RE = re.compile(r'(?P<field>algorithm|secret)\s+"?(?P<value>[^";\s]+)"?')
_TSIG_ALGORITHMS = frozenset(
    {"hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1"}
)


def check_identifier(value: str) -> str:
    """Return ``value`` as an ACME identifier: a DNS name (lowercase, no final
    dot, maybe ``*.`` first) or an IP address (RFC 8738) in its canonical text.

    Raises:
        InputError: it is neither.
    """
    text = value.strip()
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        pass
    name = text.lower().rstrip(".")
    labels = name.split(".")
    wildcard = labels[0] == "*"
    checked = labels[1:] if wildcard else labels
    if (
        len(checked) < 2
        or len(name) > 253
        or not all(_DNS_LABEL_RE.match(label) for label in checked)
        or checked[-1].isdigit()
    ):
        raise InputError(
            f"{value!r} is neither a DNS name nor an IP address: give a full name "
            "such as unit.example.com, or an address such as 203.0.113.7"
        )
    return name


def is_ip(identifier: str) -> bool:
    """Say whether an identifier (as :func:`check_identifier` returns it) is an IP."""
    try:
        ipaddress.ip_address(identifier)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class TsigKey:
    """A TSIG key for RFC 2136 updates. Its secret never goes into logs or pages.

    Attributes:
        name: the key's name, as the DNS server knows it.
        algorithm: e.g. ``hmac-sha256``.
        secret: the shared secret, base64.
    """

    name: str
    algorithm: str
    secret: str = field(repr=False)


def parse_tsig_key(text: str) -> TsigKey:
    """Read a BIND key statement (as ``tsig-keygen`` writes it).

    Raises:
        InputError: the text holds no usable key.
    """
    match = _TSIG_RE.search(text)
    if match is None:
        raise InputError(
            "the TSIG key file holds no 'key \"NAME\" { algorithm ...; secret ...; };' "
            "statement: make one with tsig-keygen"
        )
    fields = {m["field"]: m["value"] for m in _TSIG_FIELD_RE.finditer(match["body"])}
    algorithm = fields.get("algorithm", "").lower()
    if algorithm not in _TSIG_ALGORITHMS:
        raise InputError(
            f"the TSIG key uses algorithm {algorithm or '(none)'!r}: use one of "
            f"{', '.join(sorted(_TSIG_ALGORITHMS))}"
        )
    try:
        base64.b64decode(fields.get("secret", ""), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(
            "the TSIG key's secret is not base64: copy the key file as tsig-keygen "
            "wrote it"
        ) from None
    if not fields.get("secret"):
        raise InputError("the TSIG key has no secret: copy the whole key file")
    return TsigKey(match["name"].rstrip("."), algorithm, fields["secret"])


def parse_dns_server(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (or ``[V6]:PORT``, or a host alone for port 53).

    Raises:
        InputError: the port is not a number from 1 to 65535.
    """
    host, port_text = value, "53"
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_text = rest.removeprefix(":") or "53"
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InputError(
            f"the DNS server {value!r} is not HOST:PORT: write it like 192.0.2.53:53"
        )
    return host, int(port_text)


def check_hook(command: str, option: str) -> str:
    """Check that a hook command names a program that exists.

    Raises:
        InputError: it is empty, cannot be split, or its program is not found.
    """
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise InputError(f"{option} {command!r} cannot be read ({exc})") from exc
    if not words:
        raise InputError(f"{option} is empty: give the command to run")
    if shutil.which(words[0]) is None:
        raise InputError(
            f"{option}: the program {words[0]!r} is not found or not executable: "
            "give its full path"
        )
    return command


def check_ca_bundle(data: bytes) -> bytes:
    """Check that ``data`` is one or more PEM certificates.

    Raises:
        InputError: it is not.
    """
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise InputError(
            "the CA bundle holds no PEM certificate: give the CA's root certificate "
            "in PEM form"
        )
    return data


@dataclass(frozen=True)
class AcmeSettings:
    """What the owner asked for.

    Attributes:
        directory: the CA's directory URL.
        identifiers: DNS names and IP addresses, checked and in order.
        email: a contact address for the account, or None.
        challenge: ``http-01`` or ``dns-01``.
        profile: the certificate profile to ask for, or None for the CA's
            default (an IP address gets the CA's short-lived profile when it
            offers one).
        dns_server: ``HOST:PORT`` of the DNS server for RFC 2136 updates.
        dns_hook: a command that publishes and removes TXT records.
        deploy_hook: a command run after each new certificate is installed.
        production: the owner allowed a production (publicly trusted) CA.
        enabled: False after ``--off``.
        has_ca_bundle: a CA bundle for the directory's TLS is stored beside.
        has_tsig: a TSIG key is stored beside.
    """

    directory: str
    identifiers: tuple[str, ...]
    email: str | None = None
    challenge: str = "http-01"
    profile: str | None = None
    dns_server: str | None = None
    dns_hook: str | None = None
    deploy_hook: str | None = None
    production: bool = False
    enabled: bool = True
    has_ca_bundle: bool = False
    has_tsig: bool = False

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Check that the settings can work, without asking the CA.

        Raises:
            InputError: they cannot; the message says which option to change.
        """
        url = urlsplit(self.directory)
        if url.scheme != "https" or not url.netloc:
            raise InputError(
                f"the ACME directory {self.directory!r} is not an https:// URL: give "
                "the CA's directory URL"
            )
        if self.directory.rstrip("/") in PRODUCTION_DIRECTORIES and not self.production:
            raise InputError(
                "that directory issues real, publicly trusted certificates and has "
                "strict rate limits: add --production to use it, or use its staging "
                "directory for tests"
            )
        if not self.identifiers:
            raise InputError("no --domain given: name at least one DNS name or IP")
        if len(set(self.identifiers)) != len(self.identifiers):
            raise InputError("a --domain is given twice: name each one once")
        if self.challenge not in CHALLENGES:
            raise InputError(
                f"unknown challenge {self.challenge!r}: use http-01 or dns-01"
            )
        if self.email is not None and not re.fullmatch(
            r"[^@\s]+@[^@\s]+\.[^@\s]+", self.email
        ):
            raise InputError(f"{self.email!r} is not an email address")
        if self.challenge == "dns-01":
            self._check_dns01()
        elif any(i.startswith("*.") for i in self.identifiers):
            raise InputError(
                "a wildcard name can only be proven with DNS: add --challenge dns-01"
            )

    def _check_dns01(self) -> None:
        ips = [i for i in self.identifiers if is_ip(i)]
        if ips:
            raise InputError(
                f"an IP address ({ips[0]}) cannot be proven with DNS (RFC 8738): use "
                "--challenge http-01 for it"
            )
        if (self.dns_server is None) == (self.dns_hook is None):
            raise InputError(
                "dns-01 needs exactly one way to publish TXT records: either "
                "--dns-server HOST:PORT with --tsig-key-file, or --dns-hook CMD"
            )
        if self.dns_server is not None:
            parse_dns_server(self.dns_server)
            if not self.has_tsig:
                raise InputError(
                    "--dns-server needs --tsig-key-file: the server accepts only "
                    "signed updates"
                )

    @property
    def key(self) -> str:
        """The identifier set, as one string (for rate limits per set)."""
        return ",".join(sorted(self.identifiers))

    def to_json(self) -> bytes:
        """Serialise for ``acme-settings.json``."""
        raw = asdict(self)
        raw["identifiers"] = list(self.identifiers)
        return json.dumps(raw, indent=2).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> AcmeSettings:
        """Load from ``acme-settings.json``.

        Raises:
            StateError: the file is damaged or no longer valid.
        """
        try:
            raw = json.loads(data)
            raw["identifiers"] = tuple(raw["identifiers"])
            return cls(**raw)
        except (ValueError, KeyError, TypeError, InputError) as exc:
            raise StateError(
                "the state is damaged: the ACME settings are unreadable; set them "
                "again with 'unitcert device acme'"
            ) from exc

    def describe(self) -> list[tuple[str, str]]:
        """Name and value pairs for status output and pages (no secrets)."""
        rows = [
            ("Directory", self.directory),
            ("Names", ", ".join(self.identifiers)),
            ("Challenge", self.challenge),
        ]
        if self.email:
            rows.append(("Email", self.email))
        if self.profile:
            rows.append(("Profile", self.profile))
        if self.dns_server:
            rows.append(("DNS server", f"{self.dns_server} (RFC 2136, TSIG-signed)"))
        if self.dns_hook:
            rows.append(("DNS hook", self.dns_hook))
        if self.deploy_hook:
            rows.append(("Deploy hook", self.deploy_hook))
        if self.has_ca_bundle:
            rows.append(("CA bundle", "stored with the settings"))
        return rows


def read_small_file(path: Path, what: str) -> bytes:
    """Read a small file the owner named.

    Raises:
        InputError: it cannot be read or is too large.
    """
    try:
        if path.stat().st_size > 1024 * 1024:
            raise InputError(f"the {what} {path} is larger than 1 MiB")
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the {what} {path}: {exc.strerror}") from exc
