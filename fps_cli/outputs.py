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
- **Writes are durable and recognisable.** Data goes to ``.<name>.fps-tmp-<pid>-<host><random>`` beside its
  final name (a folder's files into a staging folder of that form), is fsynced, renamed, and the directory
  fsynced. A temporary whose process is gone (same host, no such pid) is removed by the next
  :meth:`~OutputPlan.check` in that directory.

Group commit (two or more files: mask + scores, the files of an existing folder, a training run's checkpoint +
metrics log + delta) is all-new or all-old after a kill at any moment:

1. every new file is written to its temporary name and fsynced (its inode is noted);
2. every final name that exists is hard-linked to a backup ``.<name>.fps-old-<pid>-<random>`` (a copy where the
   file system has no hard links);
3. a journal ``.fps-journal-<pid>-<random>.json`` listing (final, temporary, its inode, backup) for every
   entry is written, fsynced and renamed into place, one copy in every directory the group touches;
4. the temporaries are renamed onto their final names (or a final name removed), one by one;
5. the directories are fsynced and the journals unlinked: **this is the commit point**;
6. the backups are unlinked.

Anyone who finds a journal whose process is gone (the next :meth:`~OutputPlan.check` in that directory, and
every fps read of a file there through :func:`settle`) rolls the group back: a final name that holds the
temporary's inode gets its backup back (or is removed when there was none), leftovers are removed, and the
journals go last. So a group killed before step 5 reads as all old, and one killed after it as all new.

Tests can stop the process at a named write boundary: ``FPS_TEST_CRASH_AT=<point>`` (or ``<point>@<n>`` for the
n-th commit of the process) SIGKILLs it at ``written`` (temporaries complete), ``journal`` (journal in place),
``rename:<i>`` (after the i-th rename), ``renamed`` (all renamed, journal still there) or ``committed``
(journal gone, backups not yet); ``FPS_TEST_STOP_AT`` SIGSTOPs it there instead, so that a test can run a second
writer in the gap and then SIGCONT the first.
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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FileFormatError, OutputClashError, OutputExistsError, OutputWriteError

CRASH_ENV = "FPS_TEST_CRASH_AT"
STOP_ENV = "FPS_TEST_STOP_AT"
_TEMP = re.compile(r"^\.(?P<name>.+)\.fps-(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<token>[0-9a-f]+)$")
_JOURNAL = re.compile(r"^\.fps-journal-(?P<pid>\d+)-(?P<token>[0-9a-f]+)\.json$")
# The first four hex digits of every token name the host (and so the pid namespace, for containers): a leftover of
# another machine sharing the folder is never judged by a pid of this one.
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:4]
_commits = 0  # commits so far in this process, for FPS_TEST_CRASH_AT=<point>@<n>


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


# ---------------------------------------------------------------------------------------- the transaction


@dataclass
class _Entry:
    final: Path
    temp: Path | None  # None: remove the final name
    replace: bool
    inode: tuple[int, int] | None = None
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
        temp = temp_name(path)
        entry = _Entry(path, temp, self.replace if replace is None else replace)
        self.entries.append(entry)
        with _os_errors(path):
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
        staging = temp_name(folder)
        with _os_errors(folder):
            staging.mkdir()
            self._staging.append(staging)
            writer(staging)
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
                        e.inode = (st.st_dev, st.st_ino)
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

    def _group_commit(self, entries: list[_Entry], dirs: list[Path]) -> None:
        for e in entries:
            if e.final.exists() and e.temp is not None and not e.replace:  # another writer was faster
                raise OutputExistsError(f"{e.final} already exists; pass --force to replace it")
        for e in entries:
            if e.final.exists():
                e.backup = _backup_name(e.final)
                with _os_errors(e.final):
                    _link_or_copy(e.final, e.backup)
        journal_dirs = sorted({e.final.parent for e in entries})
        journals = [d / f".fps-journal-{os.getpid()}-{_token()}.json" for d in journal_dirs]
        record = {
            "pid": os.getpid(),
            "journals": [str(j.resolve()) for j in journals],
            "entries": [
                {
                    "final": str(e.final.resolve()),
                    "temp": str(e.temp.resolve()) if e.temp is not None else None,
                    "inode": list(e.inode) if e.inode else None,
                    "backup": str(e.backup.resolve()) if e.backup else None,
                }
                for e in entries
            ],
        }
        text = json.dumps(record, indent=1)
        for j in journals:
            tmp = temp_name(j)
            with _os_errors(j):
                with open(tmp, "w") as f:
                    f.write(text)
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
            _roll_back(record)
            raise
        for j in journals:
            j.unlink(missing_ok=True)
        for d in journal_dirs:
            _fsync_dir(d)
        _crash_point("committed")
        for e in entries:
            if e.backup is not None:
                e.backup.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- recovery


def settle(directory: str | os.PathLike) -> None:
    """Finish what killed fps writes left in ``directory``: roll back every journal of a process that is gone
    (its group reads as all old again) and remove its temporaries. Best effort: an unreadable folder is left."""
    directory = Path(directory)
    try:
        names = os.listdir(directory)
    except OSError:
        return
    with contextlib.suppress(OSError):
        for name in names:
            m = _JOURNAL.match(name)
            if m and _gone(m):
                try:
                    record = json.loads((directory / name).read_text())
                except (OSError, ValueError):
                    (directory / name).unlink(missing_ok=True)
                    continue
                _roll_back(record)
        for name in os.listdir(directory):
            m = _TEMP.match(name)
            if m and _gone(m):
                _remove(directory / name)


def _roll_back(record: dict) -> None:
    for e in reversed(record.get("entries", [])):
        final = Path(e["final"])
        backup = Path(e["backup"]) if e.get("backup") else None
        ours = False
        if e.get("inode"):
            with contextlib.suppress(OSError):
                st = os.stat(final)
                ours = [st.st_dev, st.st_ino] == list(e["inode"])
        if backup is not None and backup.exists():
            if ours or not final.exists():
                os.replace(backup, final)
            else:
                backup.unlink()
        elif ours:
            _remove(final)
        if e.get("temp"):
            _remove(Path(e["temp"]))
    dirs = set()
    for j in record.get("journals", []):
        Path(j).unlink(missing_ok=True)
        dirs.add(Path(j).parent)
    for d in dirs:
        _fsync_dir(d)


def _token() -> str:
    return _HOST + secrets.token_hex(4)


def _gone(match: re.Match) -> bool:
    """The leftover's process is gone: it ran on this host, and no process has its pid."""
    return match["token"].startswith(_HOST) and not _alive(int(match["pid"]))


def _alive(pid: int) -> bool:
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
    return bool(_TEMP.match(name) or _JOURNAL.match(name))


# --------------------------------------------------------------------------------------- small helpers


def temp_name(path: str | os.PathLike) -> Path:
    """A temporary name beside ``path`` that :func:`settle` recognises: ``.<name>.fps-tmp-<pid>-<random>``."""
    path = Path(path)
    if not path.name:  # "." or "./"
        path = Path(os.path.abspath(path))
    return path.parent / f".{path.name}.fps-tmp-{os.getpid()}-{_token()}"


def _backup_name(path: Path) -> Path:
    return path.parent / f".{path.name}.fps-old-{os.getpid()}-{_token()}"


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
