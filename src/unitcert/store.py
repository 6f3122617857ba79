"""The unit's on-disk state: private, atomic, crash-safe.

Layout under the state directory (mode 0700)::

    .lock                    held by whoever writes (flock)
    identity/                the long-lived key and its self-signed or factory cert
        current -> g00000007 the generation in force (a symlink)
        previous -> g00000004
        g00000004/  g00000007/
    local/                   everything the owner added; factory reset wipes it
        current -> g00000006
        ...

A generation is a directory of files written once and never changed. A commit
writes a new generation (every file created 0600 from the first byte, then
fsync-ed), fsyncs the directory, and switches ``current`` with one rename of a
symlink, then fsyncs the part. A power cut at any instant therefore leaves
``current`` naming a complete generation: the old one or the new one. Numbers
only grow and are shared by both parts, so the largest number in force is the
state's generation.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from unitcert.errors import StateError

__all__ = [
    "SERVE_LOCK_FILE",
    "Generation",
    "Part",
    "StateStore",
    "write_file_atomic",
]

logger = logging.getLogger(__name__)

_GEN_RE = re.compile(r"^g(\d{8})$")
_FILE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_DIR_MODE = 0o700
_FILE_MODE = 0o600
SERVE_LOCK_FILE = "serve.pid"


class Part(Enum):
    """The two parts of a unit's state (DESIGN.md, "The unit's state")."""

    IDENTITY = "identity"
    LOCAL = "local"


@dataclass(frozen=True)
class Generation:
    """One committed, immutable set of files of a part.

    Attributes:
        part: which part it belongs to.
        number: its number; larger is newer.
        path: its directory.
    """

    part: Part
    number: int
    path: Path

    def read(self, name: str) -> bytes:
        """Return the bytes of file ``name``.

        Raises:
            StateError: the generation has no such file.
        """
        try:
            return (self.path / name).read_bytes()
        except FileNotFoundError:
            raise StateError(
                f"the state is damaged: {self.part.value} generation "
                f"{self.number} has no {name}"
            ) from None

    def has(self, name: str) -> bool:
        """Say whether the generation holds file ``name``."""
        return (self.path / name).is_file()

    def files(self) -> dict[str, bytes]:
        """Return every file of the generation by name."""
        return {p.name: p.read_bytes() for p in sorted(self.path.iterdir())}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_private_dir(path: Path) -> None:
    """Create ``path`` as a 0700 directory, never wider whatever the umask."""
    os.mkdir(path, _DIR_MODE)
    os.chmod(path, _DIR_MODE)


def _write_private_file(path: Path, data: bytes) -> None:
    """Create ``path`` exclusively with mode 0600 from the first byte, write, fsync."""
    fd = os.open(
        path,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        _FILE_MODE,
    )
    try:
        # The umask can only narrow the creation mode; fchmod makes it exact.
        os.fchmod(fd, _FILE_MODE)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes, *, mode: int = _FILE_MODE) -> None:
    """Replace ``path`` with ``data`` in one rename, created with ``mode``.

    Readers see the old file or the new one, never a part of either.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    _write_private_file(tmp, data)
    if mode != _FILE_MODE:
        os.chmod(tmp, mode)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


_OWN_DESCRIPTOR = re.compile(r"/dev/std(out|err)|/dev/fd/(\d+)|/proc/self/fd/(\d+)")


def _own_descriptor(path: Path) -> int | None:
    """The descriptor ``path`` names in this process, if it names one."""
    match = _OWN_DESCRIPTOR.fullmatch(os.path.normpath(str(path)))
    if match is None:
        return None
    if match.group(1):
        return 1 if match.group(1) == "out" else 2
    return int(match.group(2) or match.group(3))


def write_output_file(path: Path, data: bytes, *, mode: int = _FILE_MODE) -> None:
    """Write a file the user named (a report, a label, an exported certificate).

    A regular file, new or existing, is replaced atomically as by
    :func:`write_file_atomic`; through a symbolic link, the file it points to
    is replaced and the link kept. Anything else that exists there, a device
    such as ``/dev/null`` or ``/dev/stdout``'s terminal or a FIFO, is written
    into as it is: renaming over it would put a plain file in its place (as
    root, a new ``/dev/null`` for every program on the machine).

    ``/dev/stdout``, ``/dev/stderr`` and ``/dev/fd/N`` are this process's
    own descriptors, written as they stand: a report appended to a log
    (``>> log``) stays appended, and a pipe gets it.

    Raises:
        OSError: the file cannot be written.
    """
    own = _own_descriptor(path)
    if own is not None:
        view = memoryview(data)
        while view:
            view = view[os.write(own, view) :]
        return
    real = Path(os.path.realpath(path))
    if real.parts[:2] == ("/", "proc"):
        # Another process's descriptor, a pipe: there is no file to rename.
        with open(path, "wb") as handle:
            handle.write(data)
        return
    try:
        info = real.stat()
    except FileNotFoundError:
        info = None
    if info is not None and not stat.S_ISREG(info.st_mode):
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        with open(real, "wb") as handle:
            handle.write(data)
        return
    write_file_atomic(real, data, mode=mode)


class StateStore:
    """A unit's state directory.

    Args:
        root: the state directory; it need not exist yet.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def exists(self) -> bool:
        """Say whether the state holds an identity."""
        return self.current(Part.IDENTITY) is not None

    def create(self) -> None:
        """Create the state directory and its parts, all 0700; keep what exists."""
        if not self.root.exists():
            self.root.parent.mkdir(parents=True, exist_ok=True)
            _make_private_dir(self.root)
            _fsync_dir(self.root.parent)
        elif not self.root.is_dir():
            raise StateError(
                f"the state path {self.root} exists and is not a directory"
            )
        if self.root.stat().st_mode & 0o077:
            logger.warning(
                "state directory %s was open to others; made it 0700", self.root
            )
            os.chmod(self.root, _DIR_MODE)
        for part in Part:
            path = self.root / part.value
            if not path.exists():
                _make_private_dir(path)
        _fsync_dir(self.root)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the state's writer lock (one writer at a time, across processes).

        Raises:
            StateError: the state directory does not exist.
        """
        try:
            fd = os.open(
                self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE
            )
        except FileNotFoundError:
            raise StateError(f"there is no unit state at {self.root}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Hold the state's serving lock: one ``serve`` process per state.

        The lock file (``serve.pid``) names the holder's process id while it
        runs; the kernel releases the lock when the process ends, however it
        ends.

        Raises:
            StateError: another process is serving this state.
        """
        path = self.root / SERVE_LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                raise StateError(
                    f"another 'unitcert device serve' (process {holder or '?'}) is "
                    f"already serving the state at {self.root}: stop it first, or "
                    "give this one its own --state"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)

    def serving_pid(self) -> int | None:
        """Return the process id of the ``serve`` holding this state, or None."""
        try:
            fd = os.open(self.root / SERVE_LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                return int(text) if text.isdigit() else 0
            return None
        finally:
            os.close(fd)

    def _link(self, part: Part, name: str) -> Generation | None:
        link = self.root / part.value / name
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise StateError(
                    f"the state is damaged: {link} is not a symlink"
                ) from None
            raise
        match = _GEN_RE.match(target)
        path = link.parent / target
        if match is None or not path.is_dir():
            raise StateError(
                f"the state is damaged: {link} points to {target!r}, which is not "
                "a generation; restore a backup or reset the unit"
            )
        return Generation(part, int(match.group(1)), path)

    def current(self, part: Part) -> Generation | None:
        """Return the generation in force for ``part``, or None when it has none."""
        return self._link(part, "current")

    def previous(self, part: Part) -> Generation | None:
        """Return the generation that was in force before the current one."""
        return self._link(part, "previous")

    def generation(self) -> int:
        """Return the state's generation: the largest number in force, 0 when empty."""
        numbers = [g.number for p in Part if (g := self.current(p)) is not None]
        return max(numbers, default=0)

    def watch_token(self) -> tuple[str | None, ...]:
        """Return a cheap value that changes whenever any part's generation changes."""
        token: list[str | None] = []
        for part in Part:
            try:
                token.append(os.readlink(self.root / part.value / "current"))
            except OSError:
                token.append(None)
        return tuple(token)

    def _next_number(self) -> int:
        numbers = [0]
        for part in Part:
            for entry in (self.root / part.value).iterdir():
                match = _GEN_RE.match(entry.name)
                if match:
                    numbers.append(int(match.group(1)))
        return max(numbers) + 1

    def commit(
        self, part: Part, files: Mapping[str, bytes], *, keep_previous: bool = True
    ) -> Generation:
        """Write ``files`` as the new generation of ``part`` and switch to it.

        Call with :meth:`lock` held. Every file is private (0600). A damaged
        ``current`` link is replaced, not followed.

        Args:
            part: the part to change.
            files: the whole content of the new generation, by file name.
            keep_previous: keep the generation in force as ``previous`` (for
                rollback); False removes every older generation, as a factory
                reset must, so that no old key or password stays behind.

        Raises:
            ValueError: a file name is not a plain lowercase name.
        """
        for name in files:
            if not _FILE_RE.match(name):
                raise ValueError(f"not a plain state file name: {name!r}")
        part_dir = self.root / part.value

        number = self._next_number()
        gen_dir = part_dir / f"g{number:08d}"
        _make_private_dir(gen_dir)
        for name, data in files.items():
            _write_private_file(gen_dir / name, data)
        _fsync_dir(gen_dir)

        try:
            old = self.current(part)
        except StateError:
            old = None
        if old is not None and keep_previous:
            self._point(part_dir, "previous", old.path.name)
        self._point(part_dir, "current", gen_dir.name)
        if not keep_previous:
            with contextlib.suppress(FileNotFoundError):
                (part_dir / "previous").unlink()
        self._collect_garbage(part)
        logger.debug("committed %s generation %d", part.value, number)
        return Generation(part, number, gen_dir)

    def wipe(self, part: Part) -> Generation:
        """Empty ``part`` and drop its older generations (factory reset)."""
        return self.commit(part, {}, keep_previous=False)

    def generations(self, part: Part) -> list[Generation]:
        """Return every generation directory of ``part``, newest first.

        Some may be half-written by a crash; :meth:`current` names the one in
        force.
        """
        found = []
        for entry in (self.root / part.value).iterdir():
            match = _GEN_RE.match(entry.name)
            if match and entry.is_dir() and not entry.is_symlink():
                found.append(Generation(part, int(match.group(1)), entry))
        return sorted(found, key=lambda g: g.number, reverse=True)

    def recover(
        self, part: Part, accept: Callable[[Generation], bool]
    ) -> Generation | None:
        """Repair a missing or broken ``current`` link of ``part``.

        Points it at the newest generation that ``accept`` takes (a complete
        one). Call with :meth:`lock` held.

        Returns:
            The generation in force afterwards, or None when none is acceptable.
        """
        try:
            current = self.current(part)
        except StateError:
            current = None
        else:
            if current is not None:
                return current
        for generation in self.generations(part):
            if accept(generation):
                self._point(self.root / part.value, "current", generation.path.name)
                logger.warning(
                    "the %s part had no valid current generation; restored it to "
                    "generation %d",
                    part.value,
                    generation.number,
                )
                return generation
        return None

    @staticmethod
    def _point(part_dir: Path, name: str, target: str) -> None:
        tmp = part_dir / f".{name}.new"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, part_dir / name)
        _fsync_dir(part_dir)

    def _collect_garbage(self, part: Part) -> None:
        """Remove generations that are neither current nor previous.

        These are older generations and any left half-written by a crash.
        """
        keep = set()
        for name in ("current", "previous"):
            try:
                generation = self._link(part, name)
            except StateError:
                (self.root / part.value / name).unlink()
                continue
            if generation is not None:
                keep.add(generation.path.name)
        for entry in (self.root / part.value).iterdir():
            stale_tmp = entry.name.startswith(".") and entry.name.endswith(".new")
            if (_GEN_RE.match(entry.name) and entry.name not in keep) or stale_tmp:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
