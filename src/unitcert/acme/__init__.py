"""ACME issuance and renewal for a unit, on certbot's ``acme`` library.

- :mod:`unitcert.acme.settings`: the owner's settings, checked offline.
- :mod:`unitcert.acme.schedule`: when to order: renewal window, backoff,
  limits; pure functions with injected time.
- :mod:`unitcert.acme.client`: one ACME conversation (``ClientV2``, josepy).
- :mod:`unitcert.acme.challenges`: HTTP-01 on the unit's HTTP port, DNS-01 by
  RFC 2136 with TSIG or by a hook command.
- :mod:`unitcert.acme.agent`: the loop inside ``serve``, and what other
  commands write for it.
- :mod:`unitcert.acme.cli`: ``unitcert device acme``.
"""
