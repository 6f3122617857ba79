"""unitcert: a unique TLS identity for every unit a hardware maker ships."""

__version__ = "0.1.0"
