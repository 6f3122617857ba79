"""The admin credential: the setup credential and the owner's password rules."""

from __future__ import annotations

import pytest

from unitcert.credential import (
    MIN_PASSWORD_LENGTH,
    AdminCredential,
    new_setup_credential,
)
from unitcert.errors import InputError


@pytest.mark.parametrize(
    "password",
    [
        " " * MIN_PASSWORD_LENGTH,
        " " * 40,
        "\t\n " * 5,
        "  short  " + " " * MIN_PASSWORD_LENGTH,
        "x" * (MIN_PASSWORD_LENGTH - 1),
    ],
)
def test_with_password_refuses_short_passwords_not_counting_outer_spaces(
    password: str,
) -> None:
    with pytest.raises(InputError, match="too short"):
        AdminCredential(setup=new_setup_credential()).with_password(password)


@pytest.mark.parametrize(
    "password", ["a" * MIN_PASSWORD_LENGTH, "1" * 64, " zzzzzzzzzzzz "]
)
def test_with_password_refuses_one_repeated_character(password: str) -> None:
    with pytest.raises(InputError, match="repeats a single character"):
        AdminCredential(setup=new_setup_credential()).with_password(password)


def test_with_password_refuses_the_setup_credential() -> None:
    setup = new_setup_credential()

    with pytest.raises(InputError, match="setup credential"):
        AdminCredential(setup=setup).with_password(setup.lower())


def test_with_password_accepts_a_real_password_and_checks_it() -> None:
    changed = AdminCredential(setup=new_setup_credential()).with_password(
        "correct horse battery staple"
    )

    assert not changed.must_change
    assert changed.check("correct horse battery staple")
    assert not changed.check("correct horse battery stapl")
