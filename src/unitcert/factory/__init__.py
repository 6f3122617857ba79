"""The maker's side: its CA, the registry of issued units, and provisioning.

Modules, top-down:

- :mod:`~unitcert.factory.ca`: the offline root and the name-constrained
  issuing CA, their encrypted keys, and the leaf certificates and CRLs they sign.
- :mod:`~unitcert.factory.registry`: the database of what was issued
  (SQLAlchemy: SQLite by default, PostgreSQL by URL).
- :mod:`~unitcert.factory.primes`: shared-prime checks of RSA moduli against
  the registry (one at a time, or a product tree of a batch).
- :mod:`~unitcert.factory.issue`: the checks a CSR must pass, and issuing.
- :mod:`~unitcert.factory.unit`: the unit-side steps (CSR, install the chain).
- :mod:`~unitcert.factory.provision`: the station flows, one unit or a batch.
- :mod:`~unitcert.factory.cli`: ``unitcert factory ...`` and the two
  ``unitcert device`` commands of this part.
"""
