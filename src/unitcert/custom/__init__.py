"""The owner's own certificate: import, check, install, choose, revert.

Optional and never the default: the unit's own identity stays the fallback,
and a certificate that fails any check changes nothing. Modules, top-down:

- :mod:`~unitcert.custom.bundle`: reading PEM, DER, PKCS#7 and PKCS#12 files
  as customers have them.
- :mod:`~unitcert.custom.chain`: verifying the chain with
  ``cryptography.x509.verification`` under a policy relaxed for private CAs.
- :mod:`~unitcert.custom.check`: the checks browsers will make, and the
  :class:`~unitcert.custom.check.Candidate` to preview.
- :mod:`~unitcert.custom.install`: the state: pending CSR key, install,
  ``use``, ``revert``.
- :mod:`~unitcert.custom.cli`: ``unitcert device import|use|revert``.
"""

from __future__ import annotations

from unitcert.custom.bundle import Bundle, InputFile, load_bundle
from unitcert.custom.check import Candidate, check_bundle
from unitcert.custom.install import (
    install_custom,
    make_custom_csr,
    prepare_import,
    revert_choice,
    unit_names,
    use_source,
)

__all__ = [
    "Bundle",
    "Candidate",
    "InputFile",
    "check_bundle",
    "install_custom",
    "load_bundle",
    "make_custom_csr",
    "prepare_import",
    "revert_choice",
    "unit_names",
    "use_source",
]
