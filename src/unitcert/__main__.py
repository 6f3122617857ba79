"""``python -m unitcert`` runs the command line."""

from unitcert.cli import entry_point

if __name__ == "__main__":
    entry_point()
