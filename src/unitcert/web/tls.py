"""The admin server's TLS: one listening context, certificates swapped in place.

The listening socket keeps one :class:`ssl.SSLContext` for its whole life.
Its ``sni_callback``, which OpenSSL runs during every handshake (also when
the client sends no server name), points the connection at the context of the
certificate in force. A reload builds a new context from the state and
replaces that reference; handshakes after it present the new key, and
connections opened before it carry on with the keys they agreed.

A client that resumes a TLS session made before a swap does not see a
certificate at all: it continues on the key it checked when the session began.
Resumption uses the listening context's session cache and ticket keys, which
outlive swaps.
"""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from unitcert import device
from unitcert.errors import StateError, UnitcertError
from unitcert.store import StateStore

__all__ = [
    "CertificateSwitch",
    "server_context",
]

logger = logging.getLogger(__name__)

# TLS 1.2 suites with forward secrecy and AEAD only (ECDSA and RSA keys alike);
# TLS 1.3 suites are all of that kind and keep OpenSSL's defaults.
_TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)


def server_context(chain_path: Path, key_path: Path) -> ssl.SSLContext:
    """Build a TLS 1.2+ server context serving the chain and key in the given files.

    Raises:
        StateError: the files cannot be read, or the key does not fit the chain.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(_TLS12_CIPHERS)
    context.options |= (
        ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_NO_COMPRESSION
        | ssl.OP_NO_RENEGOTIATION
    )
    try:
        context.load_cert_chain(chain_path, key_path)
    except (OSError, ssl.SSLError) as exc:
        raise StateError(
            f"the state is damaged: the certificate in {chain_path.parent} cannot be "
            "served with its key: reset the unit"
        ) from exc
    return context


@dataclass(frozen=True)
class _Served:
    unit: device.Unit
    context: ssl.SSLContext


class CertificateSwitch:
    """The certificate in force, and the listening context that serves it.

    A failed reload changes nothing: the unit keeps serving what it served.

    Args:
        store: the unit's state.

    Raises:
        StateError: the state cannot be served at all (nothing was served before).
        KeyMismatchError: the stored key and certificate do not belong together.
    """

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._token = store.watch_token()
        self._served = self._load()
        self._last_error: str | None = None
        self.listening_context = server_context(
            self._served.unit.chain_path, self._served.unit.key_path
        )
        self.listening_context.sni_callback = self._select_context
        self._log_serving(self._served.unit)

    @property
    def unit(self) -> device.Unit:
        """The unit as last loaded successfully: what is being served."""
        return self._served.unit

    @property
    def last_error(self) -> str | None:
        """Why the latest reload failed, or None when it worked."""
        return self._last_error

    def changed(self) -> bool:
        """Say whether the state moved to another generation since the last reload."""
        return self._store.watch_token() != self._token

    def reload(self) -> bool:
        """Load the state again and serve what it holds now.

        Safe to call from any thread; reloads run one at a time. Errors are
        logged, never raised.

        Returns:
            True when the state was loaded and is now served.
        """
        with self._lock:
            # Recorded before loading, so that a commit racing with this load
            # is seen as a change by the next poll.
            self._token = self._store.watch_token()
            try:
                served = self._load()
            except UnitcertError as exc:
                self._last_error = str(exc)
                logger.error(
                    "could not load the new state, still serving %s: %s",
                    self._served.unit.info.code,
                    exc,
                )
                logger.debug("reload failure", exc_info=True)
                return False
            self._served = served
            self._last_error = None
        self._log_serving(served.unit)
        return True

    def _load(self) -> _Served:
        try:
            unit = device.load_unit(self._store)
        except OSError as exc:
            raise StateError(
                f"the state at {self._store.root} cannot be read ({exc.strerror}): "
                "check the state directory"
            ) from exc
        return _Served(unit, server_context(unit.chain_path, unit.key_path))

    def _select_context(
        self, connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        connection.context = self._served.context

    @staticmethod
    def _log_serving(unit: device.Unit) -> None:
        logger.info(
            "now serving %s (%s) from generation %d",
            unit.info.code,
            device.describe_source(unit.source),
            unit.generation,
        )
