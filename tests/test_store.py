"""The unit's state: private from the first byte, atomic, and whole after any crash."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from unitcert import device
from unitcert.errors import StateError
from unitcert.store import Part, StateStore

# The os functions a commit goes through; each call is a point where power can fail.
_OS_CALLS = (
    "open",
    "write",
    "fsync",
    "fchmod",
    "close",
    "mkdir",
    "chmod",
    "symlink",
    "replace",
    "unlink",
    "rmdir",
)
_WRITE_CHUNK = 4


def _instrument_os(kill_at: int | None) -> Callable[[], int]:
    """In a forked child: count os calls, cut writes short, SIGKILL at call ``kill_at``.

    Short writes are legal for os.write, and they multiply the points at which a
    file can be cut off.
    """
    count = 0
    real = {name: getattr(os, name) for name in _OS_CALLS}

    def wrap(name: str) -> Callable[..., Any]:
        function = real[name]

        def instrumented(*args: Any, **kwargs: Any) -> Any:
            nonlocal count
            count += 1
            if count == kill_at:
                real["kill"] = os.kill
                os.kill(os.getpid(), signal.SIGKILL)
            if name == "write":
                fd, data = args
                return function(fd, bytes(data[:_WRITE_CHUNK]))
            return function(*args, **kwargs)

        return instrumented

    for name in _OS_CALLS:
        setattr(os, name, wrap(name))
    return lambda: count


def _fork(child: Callable[[], int]) -> tuple[int, int]:
    """Run ``child`` in a forked process; return (how it ended, the int it wrote)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        os.close(read_end)
        status = 0
        try:
            result = child()
            os.write(write_end, str(result).encode())
        except BaseException:
            status = 3
        os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        output = pipe.read()
    _, wait_status = os.waitpid(pid, 0)
    return wait_status, int(output) if output else -1


@pytest.fixture()
def unit_state(tmp_path: Path) -> Iterator[StateStore]:
    store = StateStore(tmp_path / "state")
    device.init_unit(store, serial="crash1")
    yield store


def test_commit_survives_sigkill_at_every_point_of_writing_a_new_generation(
    unit_state: StateStore,
) -> None:
    store = unit_state
    old_code = device.load_unit(store).info.code
    # The new generation is prepared in the parent: only the writing is cut.
    spare = StateStore(store.root.parent / "spare")
    device.init_unit(spare, serial="crash1")
    new_files = spare.current(Part.IDENTITY).files()  # type: ignore[union-attr]
    new_code = device.load_unit(spare).info.code
    # Every round starts from the same state on disk, so the points line up.
    pristine = store.root.parent / "pristine"
    shutil.copytree(store.root, pristine, symlinks=True)

    def restore() -> None:
        shutil.rmtree(store.root)
        shutil.copytree(pristine, store.root, symlinks=True)

    def commit_and_die(kill_at: int | None) -> int:
        counter = _instrument_os(kill_at=kill_at)
        with store.lock():
            store.commit(Part.IDENTITY, new_files)
        return counter()

    status, points = _fork(lambda: commit_and_die(None))
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert device.load_unit(store).info.code == new_code
    assert points >= 200, f"only {points} points to cut a commit at"

    seen = {old_code: 0, new_code: 0}
    for kill_at in range(1, points + 1):
        restore()

        status, _ = _fork(lambda kill_at=kill_at: commit_and_die(kill_at))  # type: ignore[misc]
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

        unit = device.load_unit(store)  # raises on a mix of key and cert, or none
        seen[unit.info.code] += 1
        # Whatever the crash left behind, the next commit works and is whole.
        with store.lock():
            store.commit(Part.IDENTITY, new_files)
        assert device.load_unit(store).info.code == new_code

    # Early kills leave the old generation, kills after the switch the new one.
    assert seen[old_code] > 0 and seen[new_code] > 0
    assert seen[old_code] + seen[new_code] == points


def test_reset_killed_at_random_moments_leaves_a_whole_identity(
    unit_state: StateStore,
) -> None:
    store = unit_state
    command = [
        sys.executable,
        "-m",
        "unitcert",
        "device",
        "reset",
        "--state",
        str(store.root),
        "--yes",
        "--regenerate-identity",
    ]
    # Time one whole reset here and now (the machine may be busy), then spread
    # the kills from the interpreter start to past the commit.
    started = time.monotonic()
    subprocess.run(command, check=True, capture_output=True)
    duration = time.monotonic() - started
    code = device.load_unit(store).info.code
    interrupted = finished = 0
    attempts = 40
    for attempt in range(attempts):
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(duration * 1.3 * attempt / attempts)
        process.send_signal(signal.SIGKILL)
        process.wait()

        after = device.load_unit(store).info.code  # whole, or this raises
        interrupted += after == code
        finished += after != code
        code = after
    # The kills spanned the whole reset: some before its commit, some after.
    assert interrupted > 0 and finished > 0, (interrupted, finished)


def test_files_are_private_even_with_umask_000(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        store = StateStore(tmp_path / "state")
        device.init_unit(store, serial="umask0")
    finally:
        os.umask(old)

    identity = store.current(Part.IDENTITY)
    assert identity is not None
    key_mode = stat.S_IMODE((identity.path / "key.pem").stat().st_mode)
    assert key_mode == 0o600
    for directory in [
        store.root,
        store.root / "identity",
        store.root / "local",
        identity.path,
    ]:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    for path in store.root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_key_file_is_never_visible_with_a_wider_mode(tmp_path: Path) -> None:
    """The mode is set by open(2) itself: no window where the key is 0644."""
    store = StateStore(tmp_path / "state")
    store.create()
    modes: list[int] = []
    real_write = os.write

    def spying_write(fd: int, data: bytes) -> int:
        modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    old = os.umask(0)
    os.write = spying_write  # type: ignore[assignment]
    try:
        with store.lock():
            store.commit(Part.IDENTITY, {"key.pem": b"-----BEGIN PRIVATE KEY-----\n"})
    finally:
        os.write = real_write
        os.umask(old)

    assert modes and set(modes) == {0o600}


def test_commit_keeps_current_and_previous_and_drops_older(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.create()
    with store.lock():
        numbers = [
            store.commit(Part.LOCAL, {"n": str(i).encode()}).number for i in range(4)
        ]

    assert store.current(Part.LOCAL).read("n") == b"3"  # type: ignore[union-attr]
    assert store.previous(Part.LOCAL).read("n") == b"2"  # type: ignore[union-attr]
    kept = sorted(
        p.name for p in (store.root / "local").iterdir() if p.name.startswith("g")
    )
    assert kept == [f"g{numbers[2]:08d}", f"g{numbers[3]:08d}"]
    assert store.generation() == numbers[3]


def test_half_written_generation_is_ignored_and_cleaned(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.create()
    with store.lock():
        store.commit(Part.LOCAL, {"n": b"1"})
    orphan = store.root / "local" / "g00000099"
    orphan.mkdir()
    (orphan / "n").write_bytes(b"half")

    assert store.current(Part.LOCAL).read("n") == b"1"  # type: ignore[union-attr]
    with store.lock():
        store.commit(Part.LOCAL, {"n": b"2"})
    assert not orphan.exists()


def test_damaged_current_link_is_a_clear_state_error(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.create()
    os.symlink("g00000042", store.root / "identity" / "current")

    with pytest.raises(StateError, match="damaged"):
        store.current(Part.IDENTITY)


def test_commit_refuses_file_names_that_escape_the_generation(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.create()
    with store.lock(), pytest.raises(ValueError, match="plain state file name"):
        store.commit(Part.LOCAL, {"../evil": b"x"})


def test_a_second_serve_on_the_same_state_is_refused(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    device.init_unit(store)

    with store.serving():
        assert store.serving_pid() == os.getpid()
        with (
            pytest.raises(StateError, match="already serving"),
            StateStore(store.root).serving(),
        ):
            pass
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "unitcert",
                "device",
                "serve",
                "--state",
                str(store.root),
                "--https-port",
                "1",
                "--http-port",
                "2",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )

    assert second.returncode == 1
    assert f"(process {os.getpid()}) is already serving" in second.stderr
    assert "Traceback" not in second.stderr
    assert store.serving_pid() is None


def _char_device_like_dev_null(path: Path) -> Path:
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return path


def test_an_output_file_that_is_a_device_is_written_into_not_replaced(
    tmp_path: Path,
) -> None:
    from unitcert.store import write_output_file

    null = _char_device_like_dev_null(tmp_path / "null")

    write_output_file(null, b"report", mode=0o644)

    assert stat.S_ISCHR(null.stat().st_mode)
    assert os.major(null.stat().st_rdev) == 1 and os.minor(null.stat().st_rdev) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]


def test_an_output_file_behind_a_symlink_is_replaced_and_the_link_kept(
    tmp_path: Path,
) -> None:
    from unitcert.store import write_output_file

    real = tmp_path / "real" / "label.png"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "label.png"
    link.symlink_to(real)

    write_output_file(link, b"new", mode=0o644)

    assert link.is_symlink() and link.read_bytes() == b"new"
    assert stat.S_IMODE(real.stat().st_mode) == 0o644
    assert sorted(p.name for p in real.parent.iterdir()) == ["label.png"]


def test_an_output_path_that_is_a_folder_is_refused(tmp_path: Path) -> None:
    from unitcert.store import write_output_file

    with pytest.raises(IsADirectoryError):
        write_output_file(tmp_path, b"data")


def test_audit_reports_to_a_device_leave_the_device_in_place(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from unitcert.audit.cli import audit

    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    (tmp_path / "unit.pem").write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )
    null = _char_device_like_dev_null(tmp_path.parent / f"{tmp_path.name}-null")

    for option in ("--json", "--html"):
        result = CliRunner().invoke(audit, [str(tmp_path), "-q", option, str(null)])

        assert result.exit_code == 0, result.output
        assert stat.S_ISCHR(null.stat().st_mode)


def _audit_to_own_stdout(
    folder: Path, stdout: Any
) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "unitcert", "audit", str(folder), "-q"]
    return subprocess.run(
        [*command, "--json", "/dev/stdout"],
        stdout=stdout,
        stderr=subprocess.PIPE,
        timeout=60,
        check=False,
    )


def _one_public_key(folder: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir()
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    (folder / "unit.pem").write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )


def test_a_report_to_dev_stdout_is_appended_to_a_log_not_put_in_its_place(
    tmp_path: Path,
) -> None:
    _one_public_key(tmp_path / "units")
    log = tmp_path / "log.txt"
    log.write_bytes(b"line 1 of an earlier log\n")
    inode = log.stat().st_ino

    with log.open("ab") as appended:
        result = _audit_to_own_stdout(tmp_path / "units", appended)

    assert result.returncode == 0, result.stderr
    text = log.read_text()
    assert text.startswith("line 1 of an earlier log\n")
    assert '"verdict": "clean"' in text
    assert log.stat().st_ino == inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "units"]


def test_a_report_to_dev_stdout_goes_down_a_pipe(tmp_path: Path) -> None:
    _one_public_key(tmp_path / "units")

    result = _audit_to_own_stdout(tmp_path / "units", subprocess.PIPE)

    assert result.returncode == 0, result.stderr
    assert b'"verdict": "clean"' in result.stdout
