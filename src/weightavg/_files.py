"""Safe file handling: every path weightavg reads is checked here, every file it writes goes through here.

Inputs (:func:`input_path`, :func:`member`, :func:`load_torch_untrusted`):

* a path the user named must be a regular file or a directory (a FIFO, a device or a socket is
  refused: reading ``/dev/zero`` never ends, a FIFO blocks);
* a file named by an input directory's own metadata (a shard index's ``weight_map``) must be a
  plain file name, found inside that directory, a regular file, and never a symbolic link that
  leads out of it;
* torch pickles are unpickled only with ``weights_only=True`` and only on a torch without known
  bypasses of it (see :data:`TORCH_FLOOR`).

Outputs (:func:`atomic_output`): written under a temporary name in the output's own directory,
flushed to disk (files and directory entries), then renamed into place in one step. Without
``force`` an existing output is never replaced, also when another process creates it while this
one writes; with ``force`` a directory is swapped in with ``renameat2(RENAME_EXCHANGE)`` where the
OS has it, so that the path always holds either the old or the new output. An output that equals
or contains one of the inputs is refused. Temporary files are removed on errors, Ctrl-C and
SIGTERM.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ._errors import WeightAvgError

__all__ = [
    "TORCH_FLOOR",
    "InputError",
    "OutputError",
    "atomic_output",
    "check_output",
    "input_path",
    "is_plain_name",
    "load_torch_untrusted",
    "member",
]

#: The oldest torch whose ``weights_only=True`` loading has no known bypass: CVE-2025-32434 was
#: fixed in 2.6, CVE-2026-24747 in 2.10. Older torch may run code hidden in a crafted file.
TORCH_FLOOR = (2, 10)


class InputError(WeightAvgError):
    """An input path or file is refused (missing, not a regular file, a path out of its directory)."""


class OutputError(WeightAvgError):
    """An output cannot be written (exists, contains an input, disk full...); nothing was replaced."""


# ----------------------------------------------------------------------------- inputs


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))
    for test, name in kinds:
        if test(mode):
            return name
    return "not a regular file"


def input_path(path: Path) -> Path:
    """Check a path the user named as an input: an existing regular file or directory.

    A symbolic link the user names is followed (they chose it); what it leads to must still be a
    regular file or a directory. Returns ``path``; raises :class:`InputError`.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file or directory") from None
    except OSError as err:
        raise InputError(f"{path}: cannot access it ({err.strerror or err})") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise InputError(f"{path}: refused: it is {_kind(st.st_mode)}, not a regular file or a directory")
    return path


_BAD_NAME = re.compile(r"[/\\:\x00]")


def is_plain_name(name: object) -> bool:
    """True for a plain file name: a string with no directory part, not ``.``/``..``, no dotfile."""
    return (isinstance(name, str) and bool(name) and not name.startswith(".")
            and _BAD_NAME.search(name) is None and len(name) <= 255)


def _inside(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def member(directory: Path, name: object, *, what: str) -> Path:
    """A file that an input directory's own metadata names (``what`` says which metadata).

    It must be a plain file name (no ``/``, no ``..``, no absolute path, no dotfile), exist in
    ``directory`` as a regular file, and not be a symbolic link that leads out of ``directory``.
    Returns the path; raises :class:`InputError` naming ``what`` and the name otherwise.
    """
    if not is_plain_name(name):
        raise InputError(f"{directory}: {what} names {name!r}: refused: only plain file names inside the "
                         "directory are accepted (no path, no '..', no absolute path, no dotfile)")
    assert isinstance(name, str)
    path = directory / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise InputError(f"{directory}: {what} names {name!r}, which is not in the directory") from None
    except OSError as err:
        raise InputError(f"{path}: cannot access it ({err.strerror or err})") from None
    if stat.S_ISLNK(st.st_mode):
        target = os.path.realpath(path)
        if not _inside(target, os.path.realpath(directory)):
            raise InputError(f"{path}: refused: a symbolic link out of the input directory (to {target}); "
                             "weightavg never follows a link out of an input directory")
        st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: refused: it is {_kind(st.st_mode)}, not a regular file")
    return path


def _torch_version() -> tuple[int, int]:
    import torch

    m = re.match(r"(\d+)\.(\d+)", str(torch.__version__))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def check_torch_floor(path: Path) -> None:
    """Raise :class:`InputError` when this torch's ``weights_only`` loading has known bypasses."""
    have = _torch_version()
    if have < TORCH_FLOOR:
        import torch

        raise InputError(
            f"{path}: refused: torch {torch.__version__} has known ways around weights_only=True "
            "(CVE-2025-32434, fixed in torch 2.6; CVE-2026-24747, fixed in torch 2.10), so a crafted "
            f"torch file could run code; upgrade torch to >= {TORCH_FLOOR[0]}.{TORCH_FLOOR[1]} to read "
            "torch files, or use safetensors files"
        )


_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # zip archive (torch >= 1.6), pickle protocol >= 2 (legacy)


def load_torch_untrusted(path: Path, *, mmap: bool | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` for a file from anyone, with one-line errors.

    Refused (:class:`InputError`): a torch older than :data:`TORCH_FLOOR`; a file that is not a
    torch file at all; a pickle holding Python objects other than plain data and tensors (the
    message never suggests ``weights_only=False``). Unreadable files raise :class:`InputError`
    with torch's reason, shortened. ``mmap`` (default: when the file is a zip archive) memory-maps
    the tensors.
    """
    import torch

    input_path(path)
    check_torch_floor(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise InputError(f"{path}: cannot read it ({err.strerror or err})") from None
    if not head.startswith(_TORCH_MAGIC):
        raise InputError(f"{path}: not a torch file (it is neither a zip archive written by torch.save "
                         "nor a pickle)")
    zipped = head.startswith(b"PK")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped if mmap is None else mmap)
    except Exception as err:
        if type(err).__name__ == "UnpicklingError":
            raise InputError(
                f"{path}: refused: it holds Python objects that are not plain weights, and torch files "
                "are only read with weights_only=True (re-save it as a state_dict or safetensors from "
                "code you trust)"
            ) from None
        msg = " ".join(str(err).split())
        if "weights_only" in msg:  # never relay torch's advice to load unsafely
            msg = type(err).__name__
        raise InputError(f"{path}: cannot read this torch file (truncated or corrupt?): {msg[:200]}") from None


# ----------------------------------------------------------------------------- outputs

_LIVE: set[str] = set()  # temporary paths being written, removed on SIGTERM
_LIVE_LOCK = threading.Lock()


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def remove_temporaries() -> None:
    """Remove every temporary output being written (called on SIGTERM and by the CLI's handler)."""
    with _LIVE_LOCK:
        live = list(_LIVE)
        _LIVE.clear()
    for p in live:
        _remove(p)


def _on_sigterm(signum: int, frame: Any) -> None:
    # installed only while a library call writes and nobody else handles SIGTERM: clean up, then
    # die of the signal as the process would have without us
    remove_temporaries()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


@contextlib.contextmanager
def _cleanup_on_sigterm() -> Iterator[None]:
    installed = False
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _on_sigterm)
                installed = True
    try:
        yield
    finally:
        if installed and signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2_fn: Any = None
_renameat2_loaded = False


def _renameat2(src: str, dst: str, flags: int) -> bool:
    """``renameat2(src, dst, flags)`` on Linux; False when the OS or file system lacks it."""
    global _renameat2_fn, _renameat2_loaded
    if not _renameat2_loaded:
        _renameat2_loaded = True
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                fn = libc.renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _renameat2_fn = fn
    if _renameat2_fn is None:
        return False
    if _renameat2_fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False  # not supported here: the caller falls back
    raise OSError(err, os.strerror(err), dst)


def _fsync_path(path: str, directory: bool) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return  # some platforms cannot open a directory: nothing more to do there
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name), False)
        _fsync_path(dirpath, True)


def _backup_name(out: Path) -> Path:
    return out.with_name(f".{out.name}.weightavg-old")


def _recover(out: Path) -> str | None:
    """Finish a directory replacement that a crash interrupted (fallback protocol only)."""
    backup = _backup_name(out)
    if not os.path.lexists(backup):
        return None
    if os.path.lexists(out):  # crashed after the new output was in place: drop the old one
        _remove(str(backup))
        return None
    os.rename(backup, out)  # crashed between the two renames: put the old output back
    _fsync_path(str(out.parent), True)
    return f"{out} was restored from an interrupted replacement ({backup.name})"


def _overlaps(out: Path, inputs: Sequence[Path]) -> Path | None:
    outs = {os.path.abspath(out), os.path.realpath(out)}
    for p in inputs:
        for q in {os.path.abspath(p), os.path.realpath(p)}:
            if any(_inside(q, o) for o in outs):
                return p
    return None


def _commit_file(tmp: str, out: Path, force: bool) -> None:
    if force:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)  # fails if out exists, whoever created it and whenever
    except FileExistsError:
        raise OutputError(f"{out} exists (created while this run was writing): not replaced; pass --force "
                          "to replace it") from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS,
                             errno.EACCES):
            raise
        _commit_noreplace(tmp, out)  # a file system without hard links
        return
    os.unlink(tmp)


def _commit_noreplace(tmp: str, out: Path) -> None:
    try:
        if _renameat2(tmp, str(out), _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise OutputError(f"{out} exists (created while this run was writing): not replaced; pass --force "
                          "to replace it") from None
    if os.path.lexists(out):
        raise OutputError(f"{out} exists (created while this run was writing): not replaced; pass --force "
                          "to replace it")
    os.rename(tmp, out)  # a directory cannot replace a non-empty one here either


def _commit_dir(tmp: str, out: Path, force: bool) -> None:
    if not (force and os.path.lexists(out)):
        try:
            _commit_noreplace(tmp, out)
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise OutputError(f"{out} exists (created while this run was writing): not replaced; pass "
                                  "--force to replace it") from None
            raise
        return
    if _renameat2(tmp, str(out), _RENAME_EXCHANGE):
        _fsync_path(str(out.parent), True)
        _remove(tmp)  # tmp now holds the old output
        return
    # no atomic exchange here: move the old output to a fixed backup name, then the new one in;
    # a crash between the two renames is repaired by the next write to `out` (see _recover)
    backup = _backup_name(out)
    os.rename(out, backup)
    try:
        _rename_second(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rename(backup, out)
        raise
    _fsync_path(str(out.parent), True)
    _remove(str(backup))


def _rename_second(tmp: str, out: Path) -> None:
    os.rename(tmp, out)  # a separate function so that tests can simulate a crash here


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO)


def _describe_os_error(err: OSError, out: Path) -> str:
    reason = err.strerror or str(err) or type(err).__name__
    return f"cannot write {out}: {reason}; nothing was written, and an existing {out} is unchanged"


def check_output(out: Path, *, directory: bool = False, force: bool = False, inputs: Sequence[Path] = ()) -> None:
    """Raise :class:`OutputError` when ``out`` cannot be written (see :func:`atomic_output`).

    Lets a command refuse its output before it does any work; :func:`atomic_output` checks again.
    """
    if out.name in ("", ".", ".."):
        raise OutputError(f"{out}: give the output its own name (not '.' or '..')")
    clash = _overlaps(out, inputs)
    if clash is not None:
        same = os.path.realpath(clash) == os.path.realpath(out)
        raise OutputError(f"{out} {'is' if same else 'contains'} the input {clash}: refused (with or without "
                          "--force): write the output somewhere else")
    if os.path.lexists(out):
        if not force:
            raise OutputError(f"{out} exists: pass --force to replace it")
        if os.path.isdir(out) != directory:
            kind = "a directory" if os.path.isdir(out) else "a file"
            raise OutputError(f"{out} is {kind}: the output here is {'a directory' if directory else 'a file'}, "
                              "so it cannot replace it")


@contextlib.contextmanager
def atomic_output(
    out: Path,
    *,
    directory: bool = False,
    force: bool = False,
    inputs: Sequence[Path] = (),
    notes: list[str] | None = None,
) -> Iterator[Path]:
    """Yield a temporary path next to ``out``; when the block ends, it becomes ``out`` in one step.

    Args:
        out: the output file (``directory=False``) or directory.
        directory: the output is a directory (the yielded path is an empty directory).
        force: replace an existing ``out``. Without it ``out`` is never replaced, also when
            another process creates it while this one writes.
        inputs: paths read to make the output: ``out`` may be neither one of them nor contain one.
        notes: receives a line when an earlier interrupted replacement had to be repaired.

    Raises:
        OutputError: ``out`` exists (without ``force``), is of the other kind, equals or contains
            an input, or cannot be written (disk full...: the message names ``out``, not the
            temporary path). Nothing is left behind on any error, Ctrl-C or SIGTERM.
    """
    out = Path(out)
    note = _recover(out)
    if note and notes is not None:
        notes.append(note)
    check_output(out, directory=directory, force=force, inputs=inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            tmp = tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        else:
            fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
            os.close(fd)
    except OSError as err:
        raise OutputError(_describe_os_error(err, out)) from None
    with _LIVE_LOCK:
        _LIVE.add(tmp)
    try:
        with _cleanup_on_sigterm():
            try:
                yield Path(tmp)
                # mkstemp/mkdtemp create private (0600/0700) paths: give the output the usual mode
                os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())
                if directory:
                    _fsync_tree(tmp)
                    _commit_dir(tmp, out, force)
                else:
                    _fsync_path(tmp, False)
                    _commit_file(tmp, out, force)
                _fsync_path(str(out.parent), True)
            except BaseException:
                _remove(tmp)
                raise
    except OSError as err:
        name = str(err.filename or "")
        if name and not name.startswith((tmp, str(out))) and err.errno not in _DISK_ERRORS:
            raise  # about something else (an input file): not an output error
        raise OutputError(_describe_os_error(err, out)) from None
    finally:
        with _LIVE_LOCK:
            _LIVE.discard(tmp)


def one_line_warnings() -> None:
    """Show warnings as ``weightavg: warning: message`` lines (for the command line)."""

    def fmt(message: Warning | str, category: type[Warning], filename: str, lineno: int,
            line: str | None = None) -> str:
        return f"weightavg: warning: {' '.join(str(message).split())}\n"

    warnings.formatwarning = fmt
