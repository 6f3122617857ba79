"""``python -m unitcert`` runs the command line."""

from unitcert.cli import entry_point

entry_point()
