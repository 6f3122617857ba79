"""The agent loop inside serve: no request may be lost to a race with a step."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from unitcert import device
from unitcert.acme import agent as agent_module
from unitcert.store import Part, StateStore


def test_a_request_committed_while_a_step_runs_gets_its_own_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = StateStore(tmp_path / "state")
    device.init_unit(store)
    steps: list[bytes | None] = []

    class SlowAgent:
        """Stands in for AcmeAgent: the first step sees a request arrive
        (another process's commit) after it has read the state."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def run_once(self) -> dt.datetime:
            local = store.current(Part.LOCAL)
            seen = local.read("marker") if local and local.has("marker") else None
            steps.append(seen)
            if len(steps) == 1:
                with store.lock():
                    files = store.current(Part.LOCAL).files()  # type: ignore[union-attr]
                    files["marker"] = b"request"
                    store.commit(Part.LOCAL, files)
            # Nothing else is due for an hour.
            return dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)

    monkeypatch.setattr(agent_module, "AcmeAgent", SlowAgent)

    async def run_for(seconds: float) -> None:
        task = asyncio.create_task(agent_module.run_agent(store, None, poll=0.05))
        await asyncio.sleep(seconds)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run_for(1.0))

    assert steps[:2] == [None, b"request"], steps
    assert len(steps) == 2, "the loop keeps stepping although nothing changed"
