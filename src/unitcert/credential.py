"""The admin credential: a unique setup credential, then the owner's password.

No unit has a default password. First boot makes a random setup credential
(80 bits, Crockford base32 so that it survives being read aloud or printed),
shown to the local operator; the first login with it forces a new password.
Passwords are kept as scrypt hashes (RFC 7914) with parameters a small unit
can afford (16 MiB, about 0.1 s on a slow core).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

from unitcert.code import ALPHABET
from unitcert.errors import InputError

__all__ = [
    "MIN_PASSWORD_LENGTH",
    "AdminCredential",
    "new_setup_credential",
]

MIN_PASSWORD_LENGTH = 10
_SCRYPT_N = 2**14
_SCRYPT_R = 8
_SCRYPT_P = 1


def new_setup_credential() -> str:
    """Return a fresh random setup credential like ``7K2M-Q3XD-9FZB-W4TN``."""
    symbols = "".join(secrets.choice(ALPHABET) for _ in range(16))
    return "-".join(symbols[i : i + 4] for i in range(0, 16, 4))


def _normalise_setup(text: str) -> str:
    return text.strip().upper().replace(" ", "").replace("-", "")


def _scrypt(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=_SCRYPT_N,
        r=_SCRYPT_R,
        p=_SCRYPT_P,
        maxmem=64 * 1024 * 1024,
        dklen=32,
    )


@dataclass(frozen=True)
class AdminCredential:
    """The unit's admin credential as kept in the local part (``admin.json``).

    Exactly one of the two is set: the setup credential (until the owner
    chooses a password) or the scrypt hash of the owner's password.

    Attributes:
        setup: the one-time setup credential, or None once replaced.
        password_salt: salt of the password hash (base64), or None.
        password_hash: scrypt hash of the password (base64), or None.
    """

    setup: str | None
    password_salt: str | None = None
    password_hash: str | None = None

    @property
    def must_change(self) -> bool:
        """True while the setup credential is still the way in."""
        return self.setup is not None

    def check(self, password: str) -> bool:
        """Say whether ``password`` opens the admin pages (constant-time compare)."""
        if self.setup is not None:
            return hmac.compare_digest(
                _normalise_setup(password).encode("utf-8"),
                _normalise_setup(self.setup).encode("utf-8"),
            )
        if self.password_salt is None or self.password_hash is None:
            return False
        actual = _scrypt(password, base64.b64decode(self.password_salt))
        return hmac.compare_digest(actual, base64.b64decode(self.password_hash))

    def with_password(self, password: str) -> AdminCredential:
        """Return the credential with ``password`` as the owner's password.

        The length is counted without surrounding whitespace, which people
        type by accident and which guards nothing.

        Raises:
            InputError: the password is too short, repeats one character, or is
                the setup credential.
        """
        counted = password.strip()
        if len(counted) < MIN_PASSWORD_LENGTH:
            raise InputError(
                f"the new password is too short: use at least {MIN_PASSWORD_LENGTH} "
                "characters, not counting spaces at either end"
            )
        if len(set(counted)) == 1:
            raise InputError(
                "the new password repeats a single character: choose one that is "
                "harder to guess"
            )
        if self.setup is not None and _normalise_setup(password) == _normalise_setup(
            self.setup
        ):
            raise InputError(
                "the new password is the setup credential: choose one of your own"
            )
        salt = secrets.token_bytes(16)
        return AdminCredential(
            setup=None,
            password_salt=base64.b64encode(salt).decode("ascii"),
            password_hash=base64.b64encode(_scrypt(password, salt)).decode("ascii"),
        )

    def to_json(self) -> bytes:
        """Serialise for ``admin.json``."""
        return json.dumps(
            {
                "setup": self.setup,
                "password_salt": self.password_salt,
                "password_hash": self.password_hash,
            },
            indent=2,
        ).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> AdminCredential:
        """Load from ``admin.json``.

        Raises:
            InputError: the file is not a credential record.
        """
        try:
            raw = json.loads(data)
            return cls(
                setup=raw["setup"],
                password_salt=raw["password_salt"],
                password_hash=raw["password_hash"],
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError("the admin credential record is damaged") from exc
