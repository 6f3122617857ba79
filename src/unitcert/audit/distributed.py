"""The batch GCD on an existing Dask cluster.

The moduli are split into groups (by default one per worker thread). Each
group's product tree is built on a worker and stays there; only the group
products travel to the client, which computes for each group the product of
the *other* groups and sends it back; each worker then walks its group's
remainder tree against that product. The results are those of the
single-machine run (:func:`unitcert.quality.batchgcd.batch_gcd`), number for
number.

Dask is an optional dependency (the ``fleet`` extra).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from typing import Any

from unitcert.errors import AuditError, InputError
from unitcert.quality.batchgcd import (
    PRODUCT_STAGE,
    REMAINDER_STAGE,
    GroupTree,
    ProgressCallback,
    build_group_tree,
    descend_group_tree,
    other_products,
    plan_groups,
)

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "batch_gcd_on_dask", "check_dask_address"]

logger = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 20.0


def _tree_size(tree: GroupTree) -> int:
    return tree.nbytes()


def _register_sizeof() -> None:
    # Tell Dask how big a tree is, so that the scheduler runs the remainder
    # step where the tree already lives instead of moving it.
    sizeof: Any = importlib.import_module("dask.sizeof").sizeof
    sizeof.register(GroupTree)(_tree_size)


def _build(moduli: list[int]) -> GroupTree:
    _register_sizeof()
    return build_group_tree(moduli)


def _root(tree: GroupTree) -> Any:
    return tree.root


def _descend(tree: GroupTree, others: Any) -> list[int]:
    return descend_group_tree(tree, others)


_SCHEMES = ("tcp", "tls", "ws", "wss", "ucx", "inproc")


def _import_distributed() -> Any:
    try:
        return importlib.import_module("distributed")
    except ImportError:
        raise InputError(
            "--dask needs Dask's distributed scheduler: install unitcert with the "
            "fleet extra (pip install 'unitcert[fleet]')"
        ) from None


def check_dask_address(address: str) -> None:
    """Refuse a scheduler address that Dask cannot parse, before any work.

    Raises:
        InputError: Dask is not installed, or the address is malformed.
    """
    addressing: Any = importlib.import_module(
        _import_distributed().__name__ + ".comm.addressing"
    )
    example = "write one like tcp://10.0.0.5:8786"
    try:
        scheme, location = addressing.parse_address(address)
        if scheme in ("tcp", "tls", "ws", "wss"):
            addressing.parse_host_port(location)
    except (ValueError, TypeError):
        raise InputError(
            f"{address!r} is not a Dask scheduler address: {example}"
        ) from None
    if scheme not in _SCHEMES:
        raise InputError(f"{address!r} uses the unknown protocol {scheme!r}: {example}")


def batch_gcd_on_dask(
    moduli: Sequence[int],
    address: str,
    *,
    groups: int | None = None,
    progress: ProgressCallback | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> list[int]:
    """Run :func:`~unitcert.quality.batchgcd.batch_gcd` on a Dask cluster.

    Args:
        moduli: the distinct moduli.
        address: the scheduler's address, e.g. ``tcp://10.0.0.5:8786``.
        groups: how many groups to split the moduli into; by default the
            cluster's number of worker threads (at least 2).
        progress: called with ``(stage, fraction)`` as groups finish.
        connect_timeout: seconds to wait for the scheduler.

    Returns:
        One GCD per modulus, in order.

    Raises:
        InputError: Dask is not installed, the address is malformed, the
            scheduler cannot be reached, or no worker joined it in time.
        AuditError: the cluster failed during the work.
    """
    distributed = _import_distributed()
    check_dask_address(address)
    if not moduli:
        return []

    try:
        client = distributed.Client(
            address, timeout=connect_timeout, set_as_default=False
        )
    except (OSError, TimeoutError) as exc:
        raise InputError(
            f"cannot reach the Dask scheduler at {address} ({exc}): check the address "
            "and that the scheduler is running"
        ) from None
    with client:
        _wait_for_workers(client, address, connect_timeout)
        try:
            return _run_on(client, distributed, moduli, address, groups, progress)
        except OSError as exc:
            # Dask's timeouts and lost connections are OSErrors.
            raise AuditError(
                f"the batch GCD on the Dask cluster at {address} failed ({exc}): "
                "check the cluster's scheduler and workers"
            ) from exc


def _wait_for_workers(client: Any, address: str, timeout: float) -> None:
    """Refuse a cluster that has no worker, after waiting ``timeout`` for one.

    A cluster that scales on demand may start its first worker only now, so
    a cluster without workers is given the connection's time to get one.
    """
    if client.nthreads():
        return
    logger.info("the Dask cluster at %s has no workers yet: waiting", address)
    try:
        client.wait_for_workers(1, timeout=timeout)
    except (OSError, TimeoutError):
        raise InputError(
            f"the Dask cluster at {address} has no workers (none joined within "
            f"{timeout:g} s): start workers for it (dask worker {address}) or "
            "run without --dask"
        ) from None


def _run_on(
    client: Any,
    distributed: Any,
    moduli: Sequence[int],
    address: str,
    groups: int | None,
    progress: ProgressCallback | None,
) -> list[int]:
    """The batch GCD on a connected client (see :func:`batch_gcd_on_dask`)."""
    _register_sizeof()
    threads = sum(client.nthreads().values())
    ranges = plan_groups(len(moduli), groups or max(2, threads))
    logger.info(
        "batch GCD on Dask at %s: %d moduli in %d groups over %d threads",
        address,
        len(moduli),
        len(ranges),
        threads,
    )
    parts = [
        client.scatter([[int(moduli[i]) for i in r]], hash=False)[0] for r in ranges
    ]
    trees = [client.submit(_build, part, pure=False) for part in parts]
    roots = [client.submit(_root, tree, pure=False) for tree in trees]
    _wait(
        distributed.as_completed(roots, loop=client.loop),
        PRODUCT_STAGE,
        ranges,
        roots,
        progress,
    )
    del parts

    others = other_products(client.gather(roots))
    other_futures = [client.scatter([value], hash=False)[0] for value in others]
    del others
    results = [
        client.submit(_descend, tree, other, pure=False)
        for tree, other in zip(trees, other_futures, strict=True)
    ]
    _wait(
        distributed.as_completed(results, loop=client.loop),
        REMAINDER_STAGE,
        ranges,
        results,
        progress,
    )
    gcds: list[int] = []
    for part in client.gather(results):
        gcds.extend(part)
    return gcds


def _wait(
    finished: Any,
    stage: str,
    ranges: list[range],
    futures: list[Any],
    progress: ProgressCallback | None,
) -> None:
    size = {future.key: len(r) for future, r in zip(futures, ranges, strict=True)}
    total = sum(size.values())
    done = 0
    for future in finished:
        done += size[future.key]
        if progress is not None:
            progress(stage, done / total)
