"""Running the unit's servers: HTTPS admin pages, the HTTP redirect, reloads, renewal.

One event loop runs both listening sockets and three background tasks: a
watcher that reloads the certificate when the state moves to another
generation (polled every half second, at once on SIGHUP), an hourly
renewal of the self-signed certificate, and the ACME agent
(:func:`unitcert.acme.agent.run_agent`, which answers HTTP-01 through the
plain-HTTP listener). No task ever stops the server: their failures are
logged and the unit keeps serving what it served.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import ssl
from collections.abc import Callable, MutableMapping

from aiohttp import web

from unitcert import device
from unitcert.errors import InputError
from unitcert.store import StateStore
from unitcert.web.admin import admin_app
from unitcert.web.redirect import ACME_RESPONSES, redirect_app
from unitcert.web.tls import CertificateSwitch

__all__ = [
    "POLL_INTERVAL",
    "RENEW_INTERVAL",
    "run_server",
]

logger = logging.getLogger(__name__)

POLL_INTERVAL = 0.5
RENEW_INTERVAL = 3600.0
# A unit's admin requests are short; a long grace period only delays a restart.
_SHUTDOWN_TIMEOUT = 3.0


def run_server(
    store: StateStore,
    *,
    bind: str = "127.0.0.1",
    https_port: int = 8443,
    http_port: int = 8080,
    on_listening: Callable[[], None] | None = None,
) -> None:
    """Serve the admin pages over HTTPS and redirect HTTP, until SIGINT or SIGTERM.

    Args:
        store: the unit's state; it must already hold an identity.
        bind: the address to listen on.
        https_port: the port of the admin pages.
        http_port: the port that redirects to ``https_port``.
        on_listening: called once, when both sockets are bound.

    Raises:
        StateError: the state holds nothing that can be served.
        KeyMismatchError: the stored key and certificate do not belong together.
        InputError: a port is in use, or the address cannot be bound.
    """
    asyncio.run(_serve(store, bind, https_port, http_port, on_listening))


async def _serve(
    store: StateStore,
    bind: str,
    https_port: int,
    http_port: int,
    on_listening: Callable[[], None] | None,
) -> None:
    switch = await asyncio.to_thread(CertificateSwitch, store)
    admin = web.AppRunner(admin_app(store, switch), shutdown_timeout=_SHUTDOWN_TIMEOUT)
    plain_app = redirect_app(https_port=https_port, bind=bind)
    plain = web.AppRunner(plain_app, shutdown_timeout=_SHUTDOWN_TIMEOUT)
    stop = asyncio.Event()
    reload_now = asyncio.Event()
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    try:
        await admin.setup()
        await plain.setup()
        await _listen(admin, bind, https_port, "--https-port", switch.listening_context)
        await _listen(plain, bind, http_port, "--http-port", None)

        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload_now.set)
        tasks.append(asyncio.create_task(_watch(switch, reload_now)))
        tasks.append(asyncio.create_task(_renew(store)))
        tasks.append(asyncio.create_task(_acme(store, plain_app[ACME_RESPONSES])))
        logger.info(
            "admin pages at https://%s:%d/, plain HTTP on port %d redirects there",
            f"[{bind}]" if ":" in bind else bind,
            https_port,
            http_port,
        )
        if on_listening is not None:
            on_listening()

        await stop.wait()
        logger.info("stopping the admin server")
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        await plain.cleanup()
        await admin.cleanup()


async def _listen(
    runner: web.AppRunner,
    bind: str,
    port: int,
    option: str,
    context: ssl.SSLContext | None,
) -> None:
    site = web.TCPSite(runner, bind, port, ssl_context=context)
    try:
        await site.start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise InputError(
                f"port {port} on {bind} is already in use: stop the other server "
                f"or choose {option}"
            ) from exc
        if exc.errno == errno.EACCES:
            raise InputError(
                f"port {port} on {bind} needs more privileges: run as root or "
                f"choose {option} above 1023"
            ) from exc
        raise InputError(
            f"cannot listen on {bind} port {port} ({exc.strerror}): choose another "
            f"--bind address or {option}"
        ) from exc


async def _watch(switch: CertificateSwitch, reload_now: asyncio.Event) -> None:
    while True:
        try:
            await asyncio.wait_for(reload_now.wait(), POLL_INTERVAL)
            forced = True
        except TimeoutError:
            forced = False
        reload_now.clear()
        try:
            if forced:
                logger.info("reloading the certificate on SIGHUP")
                await asyncio.to_thread(switch.reload)
            elif switch.changed():
                logger.debug("the state moved to another generation; reloading")
                await asyncio.to_thread(switch.reload)
        except Exception as exc:
            logger.error(
                "the certificate reload failed, still serving the old one: %s", exc
            )
            logger.debug("reload failure", exc_info=True)


async def _renew(store: StateStore) -> None:
    while True:
        await asyncio.sleep(RENEW_INTERVAL)
        try:
            if await asyncio.to_thread(device.renew_self_signed_if_due, store):
                logger.info(
                    "renewed the self-signed certificate; the watcher serves it"
                )
        except Exception as exc:
            logger.error("could not renew the self-signed certificate: %s", exc)
            logger.debug("renewal failure", exc_info=True)


async def _acme(store: StateStore, http_responses: MutableMapping[str, str]) -> None:
    # Imported here: a unit without ACME never loads the ACME libraries' weight
    # before it serves.
    from unitcert.acme.agent import run_agent

    await run_agent(store, http_responses)
