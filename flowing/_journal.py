"""The durable journal: one JSON line per succeeded task, keyed by its step key.

A line is ``{"v", "key", "task", "serializer", "data", "check"}``; ``check`` is
a hash of ``data``, so a damaged line is recognised and skipped. Every record
is appended with one ``write`` on a descriptor opened with ``O_APPEND``, under
an exclusive ``flock`` where the platform has one, and is on disk (in the OS
cache, or on the device with ``fsync=True``) before its task counts as done.
Reading fails closed: a line that cannot be read is a miss, never a hit.

A path is checked before anything runs: it must be a regular file (or not exist
yet, in a folder that does), writable, and empty or flowing's own (a line that
starts as every record does), so another program's file is never appended to,
emptied or compacted away.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import anyio.to_thread

from ._exceptions import InvalidJournalError, InvalidKeepError
from ._graph import Graph
from ._keys import KEY_VERSION, compute_step_key
from ._log import logger
from ._results import REPLAYED_REASON, StepResult, StepState
from ._serializers import Serializer

if sys.platform != "win32":
    import errno
    import fcntl

    _NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}

    def _lock(fd: int, *, exclusive: bool) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError as error:
            if error.errno not in _NO_LOCKS:
                raise
            # A file system without flock (some network mounts): O_APPEND single
            # writes still keep concurrent records whole on a local disk.

else:  # pragma: no cover - Windows has no flock; O_APPEND single writes remain

    def _lock(fd: int, *, exclusive: bool) -> None:
        pass


@dataclass(frozen=True, slots=True)
class _Record:
    key: str
    task: str
    serializer: str
    data: str

    def line(self) -> bytes:
        return encode_record(self.key, self.task, self.serializer, self.data)


class Journal:
    """The journal file of one Flow, with its serializer and durability setting."""

    def __init__(self, path: str | os.PathLike[str], serializer: Serializer, fsync: bool) -> None:
        self.path = _check_path(path)
        self.serializer = serializer
        self.fsync = fsync

    async def open_run(
        self, graph: Graph, untrusted: Collection[str], kept: Collection[str], *, fresh: bool
    ) -> JournalRun:
        """Every task's key, and the replayed result of each task not ``kept``.

        Reading, hashing and deserialising all happen in a worker thread, off the
        event loop. ``untrusted`` names overridden tasks (unkeyed, with their
        dependents); ``fresh`` empties the journal instead of reading it.
        """
        return await anyio.to_thread.run_sync(self._open_run, graph, untrusted, kept, fresh)

    def _open_run(
        self, graph: Graph, untrusted: Collection[str], kept: Collection[str], fresh: bool
    ) -> JournalRun:
        keys = step_keys(graph, untrusted)
        records = _parse(self.path, self._open(fresh))
        self._warn_other_serializers(records)
        replays = {}
        for i, (task, key) in enumerate(zip(graph.tasks, keys)):
            record = records.get(key) if key is not None else None
            if record is not None and task.name not in kept:
                result = self._replay(record, task.name, task.detached)
                if result is not None:
                    replays[i] = result
        return JournalRun(self, keys, replays, records)

    def _warn_other_serializers(self, records: Mapping[str, _Record]) -> None:
        """One warning for the records another serializer wrote: their tasks run again."""
        others = Counter(r.serializer for r in records.values())
        others.pop(self.serializer.name, None)
        if others:
            logger.warning(
                "journal %r: ignored %d record(s) written by the %s serializer; this flow "
                "uses %r, so their tasks run again",
                self.path,
                sum(others.values()),
                " and ".join(map(repr, sorted(others))),
                self.serializer.name,
            )

    def _replay(self, record: _Record, name: str, detached: bool) -> StepResult | None:
        if record.serializer != self.serializer.name:  # counted when the run opened
            return None
        try:
            value = self.serializer.loads(record.data)
        except Exception as error:
            logger.warning(
                "task %r: its journaled value could not be loaded (%s: %s); running it again",
                name,
                type(error).__name__,
                error,
            )
            return None
        return StepResult(
            name,
            StepState.SUCCEEDED,
            value=value,
            reason=REPLAYED_REASON,
            detached=detached,
            cached=True,
            step_key=record.key,
        )

    def _open(self, fresh: bool) -> bytes:
        """The journal's content, after checking it can be appended to; ``fresh``
        empties it instead (under the lock, so a concurrent writer is not cut in half)."""
        _check_path(self.path)  # it may have changed since the Flow was built
        try:
            with _Locked(self.path, write=True, exclusive=fresh) as fd:
                if fd is None:
                    _check_folder(self.path)
                    return b""
                content = _read_all(fd)
                _check_is_journal(self.path, content)
                if fresh:
                    os.ftruncate(fd, 0)
                    return b""
                return content
        except OSError as error:
            raise InvalidJournalError(
                self.path,
                f"opening it to read and append failed ({error.strerror or error})",
                "check its permissions, or give another path",
            ) from error

    def append(self, line: bytes) -> None:
        """Append one record line with a single write, sealing a line a crash left open."""
        with _Locked(self.path, write=True, create=True) as fd:
            assert fd is not None
            size = os.fstat(fd).st_size
            if size and _last_byte(fd, size) != b"\n":
                line = b"\n" + line
            _write_all(fd, line)
            if self.fsync:
                os.fsync(fd)
                if size == 0:
                    _fsync_directory(self.path)  # a new file's directory entry


class JournalRun:
    """One run's view of the journal: each task's key, its replayed result, its writer."""

    def __init__(
        self,
        journal: Journal,
        keys: list[str | None],
        replays: dict[int, StepResult],
        records: Mapping[str, _Record] | None = None,
    ) -> None:
        self.journal = journal
        self.keys = keys  # by task index; None: the task runs and is not journaled
        self.replays = replays  # by task index: results loaded from the journal
        self.records = records or {}  # every record read when the run opened, by key

    def cached(self, i: int) -> StepResult | None:
        """The replayed result of task ``i``, or None when it must run."""
        return self.replays.get(i)

    async def load(self, key: str, name: str, detached: bool) -> StepResult | None:
        """The result recorded under any ``key`` (a cache or instance key), or None."""
        record = self.records.get(key)
        if record is None:
            return None
        return await anyio.to_thread.run_sync(self.journal._replay, record, name, detached)

    async def save(self, key: str, result: StepResult) -> None:
        """Journal a succeeded ``result`` under any ``key`` (a cache or instance key)."""
        await anyio.to_thread.run_sync(self._save, key, result)

    async def finish(self, i: int, result: StepResult) -> StepResult:
        """Stamp ``result`` with its key and, if it succeeded, journal it before returning."""
        key = self.keys[i]
        if key is None:
            return result
        result = replace(result, step_key=key)
        if result.succeeded:
            await anyio.to_thread.run_sync(self._save, key, result)
        return result

    def _save(self, key: str, result: StepResult) -> None:
        serializer = self.journal.serializer
        try:
            data = serializer.dumps(result.value)
            if not isinstance(data, str):
                raise TypeError(f"its dumps returned {type(data).__name__}, not str")
        except Exception as error:
            logger.warning(
                "task %r: its value was not journaled, the %s serializer refused it (%s: %s); "
                "it will run again next time",
                result.name,
                serializer.name,
                type(error).__name__,
                error,
            )
            return
        try:
            self.journal.append(encode_record(key, result.name, serializer.name, data))
        except (OSError, InvalidJournalError) as error:  # gone bad mid-run: keep the result
            logger.warning(
                "task %r: its value was not journaled, writing %r failed: %s",
                result.name,
                self.journal.path,
                error,
            )


def step_keys(graph: Graph, untrusted: Collection[str] = ()) -> list[str | None]:
    """The key of every task by index; None for a task that is not cached.

    A task is unkeyed when its code cannot be fingerprinted, when its name is in
    ``untrusted`` (an overridden value), when a dependency is unkeyed, or when
    another task of the graph has the same key (they differ only in something
    the key leaves out, such as a captured object, so neither can be trusted).
    """
    excluded = set(untrusted)
    while True:
        keys, errors = _chained_keys(graph, excluded)
        seen: dict[str, str] = {}
        clashes: dict[str, str] = {}
        for task, key in zip(graph.tasks, keys):
            if key is not None:
                if key in seen:
                    clashes[task.name] = seen[key]
                seen.setdefault(key, task.name)
        if not clashes:
            break
        for name, first in clashes.items():
            logger.warning(
                "tasks %r and %r have the same step key (the same code and inputs); if they "
                "differ only in something the key leaves out, such as a captured object or "
                "a global, one would be replayed for the other, so neither is cached",
                first,
                name,
            )
            excluded.update((name, first))
    for name, error in errors.items():
        logger.warning("task %r is not cached: %s", name, error)
    return keys


def _chained_keys(
    graph: Graph, excluded: Collection[str]
) -> tuple[list[str | None], dict[str, Exception]]:
    keys: list[str | None] = []
    errors: dict[str, Exception] = {}
    for task, deps in zip(graph.tasks, graph.deps):
        dep_keys = {graph.tasks[d].name: keys[d] for d in deps}
        key: str | None = None
        if task.name not in excluded and None not in dep_keys.values():
            try:
                key = compute_step_key(task, {n: k for n, k in dep_keys.items() if k})
            except Exception as error:
                errors[task.name] = error
        keys.append(key)
    return keys, errors


def encode_record(key: str, task: str, serializer: str, data: str) -> bytes:
    """One journal line, newline included; JSON escapes keep it on one line."""
    record = {
        "v": KEY_VERSION,
        "key": key,
        "task": task,
        "serializer": serializer,
        "data": data,
        "check": _check(data),
    }
    return json.dumps(record, separators=(",", ":")).encode("ascii") + b"\n"


def read_records(path: str) -> dict[str, _Record]:
    """The latest valid record per key; damaged lines are skipped with a warning."""
    with _Locked(path, write=False, exclusive=False) as fd:
        content = _read_all(fd) if fd is not None else b""
    return _parse(path, content)


def compact_journal(
    path: str | os.PathLike[str],
    *,
    keep: Mapping[str, str | None] | Iterable[str | None] | None = None,
) -> int:
    """Rewrite a journal with only the latest record per key; returns the lines removed.

    With ``keep`` (``flow.step_keys()``, whose values are taken, or any iterable
    of step keys), records of any other key are removed too. Damaged lines are
    always removed. The new file replaces the old one atomically, so a crash
    during compaction leaves one or the other. A file that is not a journal is
    refused (InvalidJournalError) and left as it is.
    """
    path = _check_path(path)
    wanted = None if keep is None else _wanted_keys(keep)
    with _Locked(path, write=False, exclusive=True) as fd:
        if fd is None:
            raise FileNotFoundError(f"no journal at {path!r}")
        content = _read_all(fd)
        _check_is_journal(path, content)
        records = [
            r for r in _parse(path, content).values() if wanted is None or r.key in wanted
        ]
        body = b"".join(r.line() for r in records)
        _replace_atomically(path, body)
    return sum(1 for line in content.split(b"\n") if line) - len(records)


def _wanted_keys(keep: Mapping[str, str | None] | Iterable[str | None]) -> set[str]:
    """The step keys in ``keep``: a Mapping's values, or the items of an iterable."""
    if isinstance(keep, (str, bytes)):
        raise InvalidKeepError(keep, "one key would be read as its characters; pass keep=[key]")
    values = keep.values() if isinstance(keep, Mapping) else keep
    try:
        keys = list(values)
    except TypeError:
        raise InvalidKeepError(keep, "it is not iterable") from None
    for key in keys:
        if key is not None and not isinstance(key, str):
            raise InvalidKeepError(
                keep, f"{key!r} is not a step key (a str); pass the keys themselves"
            )
    return {key for key in keys if key is not None}


def _parse(path: str, content: bytes) -> dict[str, _Record]:
    lines = content.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail:
        logger.warning(
            "journal %r ends in an unfinished line (a crash mid-write?); it is ignored", path
        )
    records: dict[str, _Record] = {}
    damaged: list[int] = []
    other_versions = 0
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            record = _decode(line)
        except (ValueError, RecursionError):  # RecursionError: a deeply nested line
            damaged.append(number)
            continue
        if record is None:
            other_versions += 1
            continue
        records.pop(record.key, None)  # re-insert: the latest record sits last
        records[record.key] = record
    if damaged:
        shown = ", ".join(map(str, damaged[:10])) + (" ..." if len(damaged) > 10 else "")
        logger.warning(
            "journal %r: skipped %d damaged line(s) (line %s)", path, len(damaged), shown
        )
    if other_versions:
        logger.warning(
            "journal %r: ignored %d record(s) written by another flowing release "
            "(a step-key version other than %d)",
            path,
            other_versions,
            KEY_VERSION,
        )
    return records


def _decode(line: bytes) -> _Record | None:
    """The record on ``line``; None for another key version; ValueError if damaged."""
    raw: Any = json.loads(line)
    if not isinstance(raw, dict) or not isinstance(raw.get("v"), int):
        raise ValueError("not a journal record")
    if raw["v"] != KEY_VERSION:
        return None
    fields = [raw.get(name) for name in ("key", "task", "serializer", "data", "check")]
    if not all(isinstance(f, str) for f in fields):
        raise ValueError("a field is missing")
    key, task, serializer, data, check = (str(f) for f in fields)
    if _check(data) != check:
        raise ValueError("the checksum does not match")
    return _Record(key, task, serializer, data)


def _check(data: str) -> str:
    return hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()[:16]


_RECORD_START = b'{"v":'  # how every line encode_record writes begins


def _check_is_journal(path: str, content: bytes) -> None:
    """Refuse a file that is neither empty nor flowing's own.

    A crash of flowing leaves at worst a damaged or unfinished line, or a run of
    zeros (a power loss), beside or instead of its records; but every line it
    ever started begins with ``_RECORD_START``. Another program's file (a CSV, a
    script) has no such line.
    """
    if content.startswith(_RECORD_START) or any(
        after + _RECORD_START in content for after in (b"\n", b"\0")
    ):
        return
    if not content.strip(b"\0\n\r\t "):  # empty, or zeros only: nothing to lose
        return
    raise InvalidJournalError(
        path,
        "it is not empty and none of its lines is a journal record (another program's file?)",
        "give the path of a new or empty file (this one is left as it was)",
    )


def _check_path(path: object) -> str:
    """``path`` as a str, refused unless it is a regular file or does not exist."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if isinstance(path, bytes):
        raise InvalidJournalError(path, "the path is bytes", "decode it with os.fsdecode(path)")
    if not isinstance(path, str) or not path or "\0" in path:
        raise InvalidJournalError(
            path, "the path must be a non-empty str or os.PathLike", "give e.g. 'run.jsonl'"
        )
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return path  # missing or unreadable: the run's start says why, if it matters
    _check_regular(path, mode)
    return path


_SPECIAL_FILES = [
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
]


def _check_regular(path: str, mode: int) -> None:
    """Refuse anything but a regular file (a directory, a FIFO, a device)."""
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        fix = f"give a file path, such as {os.path.join(path, 'run.jsonl')!r}"
        raise InvalidJournalError(path, "it is a directory", fix)
    kind = next((name for test, name in _SPECIAL_FILES if test(mode)), "a special file")
    raise InvalidJournalError(
        path, f"it is {kind}, not a regular file", "give the path of a regular file"
    )


def _check_folder(path: str) -> None:
    """A journal that does not exist yet must be creatable when its first task succeeds."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        fix = "create the folder first"
        if path.startswith("~"):
            fix = f"'~' is not expanded: pass os.path.expanduser({path!r}) for a home folder"
        raise InvalidJournalError(path, f"its folder {folder!r} does not exist", fix)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidJournalError(
            path,
            f"it does not exist and its folder {folder!r} is not writable",
            "give a path in a folder you can write to",
        )


class _Locked:
    """The journal file, opened and locked; yields None if it does not exist.

    ``write`` opens it for appending (``create``: created if missing), otherwise
    read-only; the lock is exclusive unless ``exclusive`` is False. A file that
    is not regular is refused (opened without blocking: a FIFO would wait for a
    writer forever). Compaction replaces the file, so after taking the lock the
    descriptor is checked to still be the file at ``path``; if not, it is
    opened again.
    """

    def __init__(
        self, path: str, *, write: bool, create: bool = False, exclusive: bool = True
    ) -> None:
        self.path = path
        self.flags = (os.O_RDWR | os.O_APPEND) if write else os.O_RDONLY
        self.flags |= (os.O_CREAT if create else 0) | getattr(os, "O_BINARY", 0)
        self.flags |= getattr(os, "O_NONBLOCK", 0)  # nothing to a regular file
        self.exclusive = exclusive
        self.fd: int | None = None

    def __enter__(self) -> int | None:
        while True:
            try:
                fd = os.open(self.path, self.flags, 0o666)
            except FileNotFoundError:
                if self.flags & os.O_CREAT:
                    raise
                return None
            try:
                _check_regular(self.path, os.fstat(fd).st_mode)
                _lock(fd, exclusive=self.exclusive)
                if _is_at_path(fd, self.path):
                    self.fd = fd
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def __exit__(self, *exc_info: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock


def _is_at_path(fd: int, path: str) -> bool:
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (at_path.st_dev, at_path.st_ino)


def _last_byte(fd: int, size: int) -> bytes:
    os.lseek(fd, size - 1, os.SEEK_SET)
    return os.read(fd, 1)


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _replace_atomically(path: str, body: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    import tempfile  # compaction only: keep import flowing light

    fd, temporary = tempfile.mkstemp(prefix=".journal-", dir=directory)
    try:
        _write_all(fd, body)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.chmod(temporary, os.stat(path).st_mode & 0o777)
        os.replace(temporary, path)
    except BaseException:
        if fd != -1:
            os.close(fd)
        os.unlink(temporary)
        raise
    _fsync_directory(path)


def _fsync_directory(path: str) -> None:
    if sys.platform == "win32":  # pragma: no cover - directories cannot be opened there
        return
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
