"""Where every write fps makes lives: one set of rules for files, groups of files and folders.

A command declares its inputs and all its outputs in an :class:`OutputPlan` and calls :meth:`OutputPlan.check`
before any work starts; it then writes through a :class:`Transaction`. The rules:

- **Clashes are usage errors.** Every output (a file, a folder, and each file fps writes inside a folder) is
  compared with every input and every other output, by resolved path and by inode; a clash raises
  :class:`OutputClashError` (exit 2), naming both paths and the flags.
- **Nothing is replaced without ``--force``**, not even under a race: a file output that exists is refused at
  :meth:`~OutputPlan.check`, and the final rename of a new output is exclusive (``renameat2(RENAME_NOREPLACE)``
  on Linux, else ``link`` + ``unlink``), so the second of two writers fails with the same message.
- **A folder never loses a file fps did not write in that call.** A new folder is built under a temporary name
  and renamed into place whole. An existing folder that is not empty needs ``--force``, and even then only the
  files fps writes are replaced, one group commit (below); every other file stays.
- **Writes are durable and recognisable.** Data goes to ``.<name>.fps-tmp-<pid>-w<owner><random>`` beside its
  final name (a folder's files into a staging folder of that form), is fsynced, renamed, and the directory
  fsynced. ``<owner>`` names the writer's lock file ``.fps-lock-<owner>`` in the same directory (below).

**Liveness is a lock, not a host name and pid.** A :class:`Transaction` takes an exclusive ``flock`` on a lock file
``.fps-lock-<owner>`` in every directory where it leaves a temporary, backup or journal, before it creates any of
them, and holds it until its commit or abort has cleaned them up (then unlinks the file). The kernel releases the
lock when the process dies, however it dies, so a leftover whose lock can be taken (or whose lock file is gone) was
left by a dead writer, and one whose lock is held belongs to a live one. Nothing in that judgement depends on the host
name or the pid, which a container restart changes or repeats; a copy of the folder (``cp -a``) copies the lock file
but not the lock, so the copy's leftovers read as dead. On NFS, Linux emulates ``flock`` with POSIX byte-range locks
held by the server (NLM for NFSv3, the protocol itself for NFSv4), so a live writer on another client keeps its lock
and is never judged dead; a client that crashes loses its locks when the server notices (NFSv4 lease expiry, NLM's
reboot notification). A mount with ``nolock`` (or ``local_lock=``) keeps locks on each client only: there a reader on
another client cannot see a live writer, so never run two fps commands on one folder from two machines at once.

Leftovers written by an earlier fps (no ``w<owner>`` in the name; their journals hold absolute paths) are judged as
that version did (same host name, no process with that pid), and a journal of theirs older than
:data:`OLD_JOURNAL_AGE_S` is rolled back regardless: an old writer held its journal for milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: leftovers are judged as by earlier versions (host and pid)
    fcntl = None

from .errors import FileFormatError, FpsError, OutputClashError, OutputExistsError, OutputWriteError

CRASH_ENV = "FPS_TEST_CRASH_AT"
STOP_ENV = "FPS_TEST_STOP_AT"
# ``w<owner>``: the writer's lock file (new leftovers); none: a leftover of an earlier fps, judged by host and pid.
_OWNER = r"(?:w(?P<owner>[0-9a-f]{8}))?"
_TEMP = re.compile(rf"^\.(?P<name>.+)\.fps-(?P<kind>tmp|old)-(?P<pid>\d+)-{_OWNER}(?P<token>[0-9a-f]+)$")
_JOURNAL = re.compile(rf"^\.fps-journal-(?P<pid>\d+)-{_OWNER}(?P<token>[0-9a-f]+)\.json$")
_LOCK = re.compile(r"^\.fps-lock-(?P<owner>[0-9a-f]{8})(?P<new>\.new)?$")
# Earlier fps versions began every token with four hex digits of the host name, and judged a leftover by its pid.
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:4]
OLD_JOURNAL_AGE_S = 60.0  # an earlier fps's journal older than this is a dead writer's, whatever host wrote it
LIVE_WAIT_S = 10.0  # how long a reader waits for a live writer's group commit before it refuses to read
_STALE_LOCK_S = 60.0  # a lock file never renamed into place (its writer died creating it) is removed after this
_held: set[str] = set()  # owners whose locks this process holds (never judged dead here, even where flock is fcntl)
_commits = 0  # commits so far in this process, for FPS_TEST_CRASH_AT=<point>@<n>


class OpenGroupError(FpsError):
    """An input's folder holds the journal of a group commit whose writer is still running (or cannot be judged)."""


# ------------------------------------------------------------------------------------------------ the plan


@dataclass
class _Output:
    path: Path
    flag: str
    label: str
    folder: bool = False
    names: tuple[str, ...] = ()  # a folder's files that fps writes


@dataclass
class OutputPlan:
    """A command's inputs and outputs, checked together before any work starts.

    Example:
        >>> plan = OutputPlan(force=False)
        >>> plan.input(checkpoint, "--checkpoint")
        >>> mask_path = plan.file("mask.safetensors", "--out")
        >>> plan.check()  # raises before anything is computed
        >>> with plan.transaction() as tx:
        ...     tx.write(mask_path, lambda tmp: save_mask(tmp, mask))
    """

    force: bool = False
    inputs: list[tuple[Path, str]] = field(default_factory=list)
    outputs: list[_Output] = field(default_factory=list)

    def input(self, path: str | os.PathLike | None, flag: str) -> None:
        """A file or folder the command reads (``None`` is ignored); a folder's files count as inputs too."""
        if path is None:
            return
        path = Path(path)
        self.inputs.append((path, flag))
        if path.is_dir():
            with contextlib.suppress(OSError):
                self.inputs += [(p, flag) for p in sorted(path.iterdir()) if p.is_file()]

    def file(self, path: str | os.PathLike, flag: str, label: str | None = None) -> Path:
        """A file output given by ``flag`` (``--out``), named in messages by ``label`` (default: the flag), e.g.
        ``the training checkpoint (beside --out)`` for a file whose name derives from the flag's."""
        path = Path(path)
        self.outputs.append(_Output(path, flag, label or flag))
        return path

    def folder(self, path: str | os.PathLike, flag: str, names: Iterable[str], label: str | None = None) -> Path:
        """A folder output and the names of the files fps writes in it (others it writes are checked again later)."""
        path = Path(path)
        self.outputs.append(_Output(path, flag, label or flag, folder=True, names=tuple(names)))
        return path

    def check(self, *, exists: bool = True) -> None:
        """Check every clash, then (with ``exists``) that nothing would be replaced without ``--force``.

        Leftovers of killed writes in the outputs' directories are cleaned up first (see :func:`settle`).

        Raises:
            OutputClashError: an output is an input, or two outputs name the same file (a usage error).
            OutputExistsError: an output exists and ``force`` is false; a file output is a folder.
            FileFormatError: an output's directory does not exist, or a folder output is a file.
            OutputWriteError: an output's directory cannot be written (read-only, permissions).
        """
        for out in self.outputs:
            settle(out.path.parent)
            if out.folder and out.path.is_dir():
                settle(out.path)
        for out in self.outputs:
            _check_place(out)
        files = []  # (path, flag, label, how to name the path)
        for out in self.outputs:
            files.append((out.path, out.flag, out.label, f"{out.path}/" if out.folder else str(out.path)))
            files += [(out.path / n, out.flag, out.label, str(out.path / n)) for n in out.names]
        for i, (path, flag, label, name) in enumerate(files):
            for other, other_flag in self.inputs:
                if _same(path, other):
                    raise OutputClashError(
                        f"{label} {name} is also an input ({other_flag} {other}); choose another output path", flag
                    )
            for other, _, other_label, other_name in files[:i]:
                if _same(path, other):
                    raise OutputClashError(f"{other_label} {other_name} and {label} {name} name the same file", flag)
        for out in self.outputs:
            _check_writable(out)
        if exists:
            for out in self.outputs:
                self._check_exists(out)

    def _check_exists(self, out: _Output) -> None:
        if not out.folder:
            if out.path.exists() and not self.force:
                raise OutputExistsError(f"{out.path} already exists; pass --force to replace it")
            return
        if not out.path.is_dir() or self.force:
            return
        held = [n for n in out.names if (out.path / n).exists()]
        if held:
            raise OutputExistsError(f"{out.path} already holds {' and '.join(held)}; pass --force to replace them")
        foreign = sorted(p.name for p in out.path.iterdir() if not _is_leftover(p.name))
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise OutputExistsError(
                f"{out.path} is not empty (it holds {shown}); pass --force to write into it (only "
                f"{', '.join(out.names)} are replaced; other files stay)"
            )

    def transaction(self, *, replace: bool | None = None) -> Transaction:
        """A group commit of this plan's outputs; ``replace`` (default: ``force``) lets it replace existing files."""
        return Transaction(self.force if replace is None else replace)


def _same(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_place(out: _Output) -> None:
    text = f"{out.path}/" if out.folder else str(out.path)
    if out.folder and out.path.exists() and not out.path.is_dir():
        raise FileFormatError(f"cannot write the folder {text}: {out.path} is a file")
    if not out.folder and out.path.is_dir():
        raise OutputExistsError(f"output {out.path} is a directory; give a file name")
    parent = out.path.parent
    if not parent.is_dir():
        raise FileFormatError(f"cannot write {text}: directory {parent} does not exist")


def _check_writable(out: _Output) -> None:
    """Create and remove a file where ``out`` will be written, so that a read-only folder, a permission or a full
    inode table is one line before any work, not after it (a training epoch, a data pass).

    Raises:
        OutputWriteError: naming the output as the user gave it, with the OS's reason.
    """
    where = out.path if out.folder and out.path.is_dir() else out.path.parent
    probe = temp_name(
        where / f"{out.path.name or 'out'}-probe", secrets.token_hex(4)
    )  # no lock: any settle may remove it
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise OutputWriteError(
            f"cannot write {f'{out.path}/' if out.folder else out.path}: {_reason(e) or e}"
        ) from None
    probe.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------- the transaction


@dataclass
class _Entry:
    final: Path
    temp: Path | None  # None: remove the final name
    replace: bool
    inode: tuple[int, int] | None = None
    stamp: list[int | None] | None = None  # [size, mtime_ns] of the temporary: its identity in a copied folder
    backup: Path | None = None


class Transaction:
    """Files written to temporary names, then committed together (see the module docstring).

    Use as a context manager: leaving the block normally commits, an exception removes the temporaries.
    """

    def __init__(self, replace: bool = False) -> None:
        self.replace = replace
        self.entries: list[_Entry] = []
        self._staging: list[Path] = []
        self._done = False
        self.owner = secrets.token_hex(4) if fcntl is not None else None
        self._locks: dict[str, tuple[Path, int]] = {}  # directory -> (its lock file, the locked descriptor)

    def _lock(self, directory: Path) -> None:
        """Hold this writer's lock in ``directory`` before leaving anything there (module docstring).

        The lock file is created under a name no reader judges (``.new``), locked, then renamed into place, so a
        reader never sees it unlocked while this process lives.
        """
        if self.owner is None:
            return
        key = os.path.realpath(directory)
        if key in self._locks:
            return
        final = Path(directory) / f".fps-lock-{self.owner}"
        new = final.with_name(final.name + ".new")
        fd = os.open(new, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666 & ~umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(new, final)
        except BaseException:
            os.close(fd)
            new.unlink(missing_ok=True)
            raise
        self._locks[key] = (final, fd)
        _held.add(self.owner)

    def _release(self) -> None:
        """Unlink the lock files, then let the locks go (the leftovers they guarded are gone)."""
        for final, fd in self._locks.values():
            with contextlib.suppress(OSError):
                final.unlink()
            os.close(fd)
        self._locks.clear()
        _held.discard(self.owner)

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()

    def write(self, path: str | os.PathLike, writer: Callable[[Path], object], *, replace: bool | None = None) -> Path:
        """Call ``writer(temporary path)`` to write the future ``path``; an OS error names ``path``.

        Raises:
            OutputWriteError: the disk is full, the folder is read-only, ...
        """
        path = Path(path)
        temp = temp_name(path, self.owner)
        entry = _Entry(path, temp, self.replace if replace is None else replace)
        self.entries.append(entry)
        with _os_errors(path):
            self._lock(temp.parent)
            writer(temp)
            set_mode(temp)
        return temp

    def write_bytes(self, path: str | os.PathLike, data: bytes, *, replace: bool | None = None) -> Path:
        """:meth:`write` of plain bytes."""
        return self.write(path, lambda tmp: Path(tmp).write_bytes(data), replace=replace)

    def write_folder(
        self, folder: str | os.PathLike, writer: Callable[[Path], object], *, replace: bool | None = None
    ) -> None:
        """Call ``writer(staging folder)``; a new ``folder`` is the staging folder renamed, an existing one gets
        the staged files one by one (nothing else in it is touched).

        Raises:
            OutputExistsError: an existing folder already holds a file the writer wrote, and replacing is off.
        """
        folder = Path(folder)
        replace = self.replace if replace is None else replace
        staging = temp_name(folder, self.owner)
        with _os_errors(folder):
            self._lock(staging.parent)
            staging.mkdir()
            self._staging.append(staging)
            try:
                writer(staging)
            except OutputWriteError as e:  # a file written inside: named in the folder the user gave, not staging
                raise OutputWriteError(str(e).replace(str(staging), str(folder))) from None
            for p in staging.iterdir():
                set_mode(p)
        if not folder.exists():
            self.entries.append(_Entry(folder, staging, replace=False))
            return
        for p in sorted(staging.iterdir()):
            if (folder / p.name).exists() and not replace:
                raise OutputExistsError(f"{folder} already holds {p.name}; pass --force to replace it")
            self.entries.append(_Entry(folder / p.name, p, replace))

    def staged(self, path: str | os.PathLike) -> Path:
        """Where the future ``path`` (a file written here, or a file in a folder written here) is now, before the
        commit: e.g. to measure it."""
        path = Path(path)
        for e in self.entries:
            if e.temp is not None and e.final == path:
                return e.temp
            if e.temp is not None and e.final == path.parent and e.temp.is_dir():
                return e.temp / path.name
        raise KeyError(f"{path} is not written by this transaction")

    def remove(self, path: str | os.PathLike) -> None:
        """Remove ``path`` (if it exists) as part of the group."""
        self.entries.append(_Entry(Path(path), None, True))

    def abort(self) -> None:
        """Remove the temporaries; nothing final was touched."""
        if self._done:
            return
        self._done = True
        for e in self.entries:
            if e.temp is not None:
                _remove(e.temp)
        for s in self._staging:
            _remove(s)
        self._release()

    def commit(self) -> None:
        """Make every entry final, all or nothing (module docstring).

        Raises:
            OutputExistsError: a new output appeared meanwhile (another writer) and replacing is off; the group is
                rolled back.
            OutputWriteError: an OS error, naming the path.
        """
        global _commits
        if self._done:
            return
        _commits += 1
        entries = [e for e in self.entries if e.temp is not None or e.final.exists()]
        try:
            for e in entries:
                if e.temp is not None:
                    with _os_errors(e.final):
                        _fsync_tree(e.temp)
                        st = os.stat(e.temp)
                        e.inode, e.stamp = (st.st_dev, st.st_ino), _stamp(st)
            dirs = sorted({e.final.parent for e in entries} | {e.temp.parent for e in entries if e.temp is not None})
            for d in dirs:
                _fsync_dir(d)
            _crash_point("written")
            if len(entries) == 1 and entries[0].temp is not None:
                e = entries[0]
                with _os_errors(e.final):
                    _rename(e.temp, e.final, e.replace)
                    _fsync_dir(e.final.parent)
                _crash_point("rename:1")
                _crash_point("renamed")
                _crash_point("committed")
            elif entries:
                self._group_commit(entries, dirs)
        except BaseException:
            self.abort()
            raise
        self._done = True
        for s in self._staging:
            _remove(s)
        self._release()

    def _group_commit(self, entries: list[_Entry], dirs: list[Path]) -> None:
        for e in entries:
            if e.final.exists() and e.temp is not None and not e.replace:  # another writer was faster
                raise OutputExistsError(f"{e.final} already exists; pass --force to replace it")
        for e in entries:
            with _os_errors(e.final):
                self._lock(e.final.parent)  # its backup and the journal go there
        for e in entries:
            if e.final.exists():
                e.backup = _backup_name(e.final, self.owner)
                with _os_errors(e.final):
                    _link_or_copy(e.final, e.backup)
        journal_dirs = sorted({e.final.parent for e in entries})
        name = f".fps-journal-{os.getpid()}-{_token(self.owner)}.json"
        journals = [d / name for d in journal_dirs]
        records = [self._record(entries, journals, d) for d in journal_dirs]
        for j, record in zip(journals, records, strict=True):
            tmp = temp_name(j, self.owner)
            with _os_errors(j):
                with open(tmp, "w") as f:
                    f.write(json.dumps(record, indent=1))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, j)
        for d in dirs:
            _fsync_dir(d)
        _crash_point("journal")
        try:
            for i, e in enumerate(entries, 1):
                with _os_errors(e.final):
                    if e.temp is None:
                        e.final.unlink(missing_ok=True)
                    else:
                        _rename(e.temp, e.final, e.replace)
                _crash_point(f"rename:{i}")
            for d in dirs:
                _fsync_dir(d)
            _crash_point("renamed")
        except BaseException:
            _roll_back(records[0], journal_dirs[0])
            raise
        for j in journals:
            j.unlink(missing_ok=True)
        for d in journal_dirs:
            _fsync_dir(d)
        _crash_point("committed")
        for e in entries:
            if e.backup is not None:
                e.backup.unlink(missing_ok=True)

    def _record(self, entries: list[_Entry], journals: list[Path], directory: Path) -> dict:
        """The journal kept in ``directory``: every path relative to it, so that a copy of the folder names its own
        files (a copied journal never touches the original)."""
        here = os.path.realpath(directory)

        def rel(path: Path | None) -> str | None:
            return None if path is None else os.path.relpath(_absolute(path), here)

        return {
            "version": 2,
            "owner": self.owner,
            "pid": os.getpid(),
            "journals": [rel(j) for j in journals],
            "entries": [
                {
                    "final": rel(e.final),
                    "temp": rel(e.temp),
                    "inode": list(e.inode) if e.inode else None,
                    "stamp": e.stamp,
                    "backup": rel(e.backup),
                }
                for e in entries
            ],
        }


# ------------------------------------------------------------------------------------------- recovery


def settle(directory: str | os.PathLike) -> None:
    """Finish what killed fps writes left in ``directory``: roll back every journal of a dead writer (its group reads
    as all old again) and remove its temporaries and lock file. Best effort: what cannot be undone now (a read-only
    folder) is left for later; a live writer's leftovers are never touched."""
    _settle(Path(directory))


def recover(path: str | os.PathLike) -> None:
    """Call before reading ``path`` (a file, or a folder such as an ``hf:`` model): settle its folder, so that a
    group commit killed half-way reads as all old; wait for a live writer's group to finish.

    Raises:
        OpenGroupError: the folder still holds a group commit's journal after :data:`LIVE_WAIT_S`: its writer is
            alive (or, for an earlier fps's journal, cannot be judged yet), or it could not be rolled back.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    deadline = time.monotonic() + LIVE_WAIT_S
    while True:
        failed = _settle(folder)
        if failed:
            name, reason = failed[0]
            raise OpenGroupError(
                f"{folder / name} is the journal of an fps write that was killed half-way, and rolling it back "
                f"failed ({reason}); make the folder writable and run the command again"
            )
        try:
            open_groups = sorted(n for n in os.listdir(folder) if _foreign_journal(n))
        except OSError:
            return
        if not open_groups:
            return
        if time.monotonic() >= deadline:
            m = _JOURNAL.match(open_groups[0])
            if m["owner"] is not None:
                who = "an fps command that is still running (it holds its lock)"
                retry = "run this command again when it has finished"
            else:
                who = f"fps process {m['pid']} of an earlier fps version (on this or another machine)"
                retry = (
                    f"run this command again when it has finished; if none is running, the group is rolled back "
                    f"once the journal is {OLD_JOURNAL_AGE_S:.0f} s old"
                )
            raise OpenGroupError(f"{folder / open_groups[0]} is an unfinished group write by {who}; {retry}")
        time.sleep(0.05)


def _foreign_journal(name: str) -> bool:
    m = _JOURNAL.match(name)
    return bool(m) and not (m["owner"] is not None and m["owner"] in _held)


def _settle(directory: Path) -> list[tuple[str, str]]:
    """:func:`settle`; returns ``(journal, reason)`` for every dead writer's journal it could not roll back."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    judge = _Judge(directory)
    failed = []
    try:
        for name in names:
            m = _JOURNAL.match(name)
            if not m or not judge.dead(m, journal=True):
                continue
            try:
                text = (directory / name).read_text()
            except FileNotFoundError:
                continue  # rolled back meanwhile (by another reader, or with a copy of this journal elsewhere)
            except OSError as e:
                failed.append((name, e.strerror or str(e)))
                continue
            try:
                record = json.loads(text)
                _roll_back(record, directory, name)
            except OSError as e:
                failed.append((name, e.strerror or str(e)))
            except (ValueError, TypeError, KeyError, AttributeError):  # not a journal fps wrote: it guards nothing
                with contextlib.suppress(OSError):
                    (directory / name).unlink()
        with contextlib.suppress(OSError):
            for name in os.listdir(directory):
                m = _TEMP.match(name)
                if m and judge.dead(m):
                    _remove(directory / name)
        with contextlib.suppress(OSError):
            judge.clean_locks(os.listdir(directory))
    finally:
        judge.close()
    return failed


class _Judge:
    """Decides, once per writer, whether the writer of a leftover in ``directory`` is dead (module docstring); it
    holds the lock of every dead writer it judged until :meth:`close`, so that two readers never undo one group at
    the same time."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.verdicts: dict[str, bool] = {}
        self.fds: dict[str, int] = {}

    def dead(self, m: re.Match, *, journal: bool = False) -> bool:
        owner = m["owner"]
        if owner is None:  # an earlier fps's leftover: its host and pid, or (a journal) its age
            if m["token"].startswith(_HOST) and not _alive(int(m["pid"])):
                return True
            if not journal:
                return False
            try:
                return time.time() - os.stat(self.directory / m.string).st_mtime > OLD_JOURNAL_AGE_S
            except OSError:
                return False
        if owner in _held:
            return False
        if owner not in self.verdicts:
            self.verdicts[owner] = self._lock(owner)
        return self.verdicts[owner]

    def _lock(self, owner: str) -> bool:
        """True (dead) when the writer's lock can be taken or its lock file is gone; False when it is held."""
        if fcntl is None:
            return False
        path = self.directory / f".fps-lock-{owner}"
        fd = _open_lock(path)
        if fd is None:
            return not os.path.lexists(path)
        if not _try_flock(fd):
            os.close(fd)
            return False
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            same = False
        if not same:  # cleaned up meanwhile by another reader: the writer is gone all the same
            os.close(fd)
            return True
        self.fds[owner] = fd
        return True

    def clean_locks(self, names: list[str]) -> None:
        """Remove the lock files of dead writers whose leftovers are all gone."""
        referenced = set()
        for name in names:
            m = _TEMP.match(name) or _JOURNAL.match(name)
            if m and m["owner"]:
                referenced.add(m["owner"])
        for name in names:
            m = _LOCK.match(name)
            if not m or m["owner"] in _held or m["owner"] in referenced:
                continue
            path = self.directory / name
            if m["new"]:  # its writer died creating it, or is about to rename it: only an old one is stale
                with contextlib.suppress(OSError):
                    if time.time() - os.stat(path).st_mtime > _STALE_LOCK_S:
                        fd = _open_lock(path)
                        if fd is not None:
                            if _try_flock(fd):
                                path.unlink()
                            os.close(fd)
            elif self.dead(m):
                with contextlib.suppress(OSError):
                    path.unlink()

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _open_lock(path: Path) -> int | None:
    for flags in (os.O_RDWR, os.O_RDONLY):  # read-only where the file is not writable (flock needs neither)
        try:
            return os.open(path, flags)
        except FileNotFoundError:
            return None
        except OSError:
            continue
    return None


def _try_flock(fd: int) -> bool:
    """Take ``fd``'s lock without waiting: exclusive, or shared where the file system's emulation needs a writable
    descriptor for that (NFS); either conflicts with a writer's exclusive lock."""
    for how in (fcntl.LOCK_EX, fcntl.LOCK_SH):
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError:
            continue
    return False


def _roll_back(record: dict, here: Path, journal: str | None = None) -> None:
    """Undo the group ``record`` describes; ``here``: the folder of the journal it was read from (``journal``)."""
    where, moved = _resolver(record, here, journal)
    for e in reversed(record.get("entries", [])):
        final = where(e["final"])
        backup = where(e.get("backup"))
        temp = where(e.get("temp"))
        renamed = temp is None or not os.path.lexists(temp)
        ours = False
        with contextlib.suppress(OSError):
            st = os.stat(final)
            if e.get("inode") and [st.st_dev, st.st_ino] == list(e["inode"]):
                ours = True
            elif e.get("stamp") and renamed and _stamp(st) == list(e["stamp"]):
                ours = True  # the same file in a copied folder: another inode, its size and mtime kept
            elif moved and not e.get("stamp") and renamed:
                ours = True  # an earlier fps's journal, copied with its folder: a temporary gone was renamed
        if backup is not None and backup.exists():
            if ours or not final.exists():
                os.replace(backup, final)
            else:
                backup.unlink()
        elif ours:
            _remove(final)
        if temp is not None:
            _remove(temp)
    dirs = set()
    for j in record.get("journals", []):
        path = where(j)
        path.unlink(missing_ok=True)
        dirs.add(path.parent)
    for d in dirs:
        _fsync_dir(d)


def _resolver(record: dict, here: Path, journal: str | None) -> tuple[Callable[[str | None], Path | None], bool]:
    """How a journal's paths map to this folder: relative to it (version 2), or, for an earlier fps's absolute paths,
    moved along with the journal itself (the folder may be a copy); and whether an earlier fps's journal was moved."""
    if record.get("version", 1) >= 2:
        return (lambda p: None if p is None else Path(os.path.normpath(os.path.join(here, p)))), False
    recorded = next((Path(j).parent for j in record.get("journals", []) if Path(j).name == journal), None)
    base = os.path.realpath(here)
    if recorded is None or os.path.realpath(recorded) == base:
        return (lambda p: None if p is None else Path(p)), False
    return (
        lambda p: None if p is None else Path(os.path.normpath(os.path.join(base, os.path.relpath(p, recorded))))
    ), True


def _stamp(st: os.stat_result) -> list[int | None]:
    import stat

    return [None if stat.S_ISDIR(st.st_mode) else st.st_size, st.st_mtime_ns]


def _absolute(path: Path) -> str:
    """``path`` made absolute through its folder's real path (the name itself may be a link fps replaces)."""
    return os.path.join(os.path.realpath(path.parent), path.name)


def _token(owner: str | None = None) -> str:
    return (f"w{owner}" if owner else _HOST) + secrets.token_hex(4)


def _alive(pid: int) -> bool:
    """An earlier fps's judgement, for its own leftovers only: a process with that pid exists here."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_leftover(name: str) -> bool:
    return bool(_TEMP.match(name) or _JOURNAL.match(name) or _LOCK.match(name))


# --------------------------------------------------------------------------------------- small helpers


def temp_name(path: str | os.PathLike, owner: str | None = None) -> Path:
    """A temporary name beside ``path`` that :func:`settle` recognises: ``.<name>.fps-tmp-<pid>-w<owner><random>``
    (``owner``: the writer's lock, see :class:`Transaction`)."""
    path = Path(path)
    if not path.name:  # "." or "./"
        path = Path(os.path.abspath(path))
    return path.parent / f".{path.name}.fps-tmp-{os.getpid()}-{_token(owner)}"


def _backup_name(path: Path, owner: str | None) -> Path:
    return path.parent / f".{path.name}.fps-old-{os.getpid()}-{_token(owner)}"


def umask() -> int:
    """The process's umask (reading it means setting it; set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def set_mode(path: Path) -> None:
    """The mode a plain ``open()`` would give: 0666 (0777 for a folder) less the umask; tools such as safetensors
    and ``mkdtemp`` create 0600 / 0700."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask())


def _remove(path: Path) -> None:
    """Best effort: a leftover that cannot be removed now (a read-only folder) is removed by a later settle."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for p in path.iterdir():
            _fsync_tree(p)
        _fsync_dir(path)
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        raise OutputExistsError(f"{src} is a folder; fps replaces files, not folders")
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        shutil.copy2(src, dst)
        _fsync_tree(dst)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_renameat2 = None


def _rename(src: Path, dst: Path, replace: bool) -> None:
    """Rename ``src`` onto ``dst``; without ``replace``, fail if ``dst`` exists, atomically.

    Raises:
        OutputExistsError: ``dst`` exists and ``replace`` is false.
    """
    if replace:
        os.replace(src, dst)
        return
    try:
        _rename_noreplace(src, dst)
    except FileExistsError:
        raise OutputExistsError(f"{dst} already exists; pass --force to replace it") from None


def _rename_noreplace(src: Path, dst: Path) -> None:
    global _renameat2
    if sys.platform.startswith("linux"):
        if _renameat2 is None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                _renameat2 = libc.renameat2
                _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            except (OSError, AttributeError):
                _renameat2 = False
        if _renameat2:
            if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
                return
            err = ctypes.get_errno()
            if err == errno.EEXIST:
                raise FileExistsError(err, os.strerror(err), str(dst))
            if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
                raise OSError(err, os.strerror(err), str(dst))
    if src.is_dir():  # no hard links to folders: rename, which fails onto a non-empty folder
        if dst.exists():
            raise FileExistsError(errno.EEXIST, "File exists", str(dst))
        os.rename(src, dst)
        return
    os.link(src, dst)  # fails with EEXIST, atomically
    os.unlink(src)


def _reason(e: BaseException) -> str | None:
    """The OS's words for a failed write, from the error or one it chains (safetensors and torch wrap them)."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        code = re.search(r"os error (\d+)", str(seen))  # safetensors (Rust): "... (os error 28)"
        if code:
            return os.strerror(int(code[1]))
        for number in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EFBIG):
            if os.strerror(number).lower() in str(seen).lower():
                return os.strerror(number)
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def _os_errors(path: Path) -> Iterator[None]:
    """An OS error while writing (or a library's error that wraps one) becomes one line naming ``path``."""
    try:
        yield
    except (OutputExistsError, OutputWriteError):
        raise
    except OSError as e:
        raise OutputWriteError(f"cannot write {path}: {_reason(e) or e}") from None
    except Exception as e:
        # safetensors raises SafetensorError and torch.save a RuntimeError (two chained C++ messages, which do not
        # say why) for a full disk: find the OS's reason, or see that the disk is full.
        if type(e).__name__ != "SafetensorError" and not isinstance(e, RuntimeError):
            raise
        reason = _reason(e)
        if reason is None:
            free = _free_bytes(path.parent)
            text = str(e).strip().splitlines()
            reason = os.strerror(errno.ENOSPC) if free is not None and free < 2**20 else (text[0] if text else "")
        raise OutputWriteError(f"cannot write {path}: {reason}") from None


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _crash_point(point: str) -> None:
    """Test hooks (module docstring): SIGKILL this process at ``point`` when ``FPS_TEST_CRASH_AT`` names it, or
    SIGSTOP it when ``FPS_TEST_STOP_AT`` does (a test then lets another writer run, and SIGCONTs it)."""
    for env, sig in ((CRASH_ENV, signal.SIGKILL), (STOP_ENV, getattr(signal, "SIGSTOP", None))):
        wanted = os.environ.get(env)
        if not wanted or sig is None:
            continue
        name, _, nth = wanted.partition("@")
        if name == point and (not nth or int(nth) == _commits):
            os.kill(os.getpid(), sig)
