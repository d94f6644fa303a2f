"""Writes that complete or leave nothing behind, and the OS's write errors said in words.

Every file a command publishes (a checkpoint, the final adapter, a merged folder, a GGUF) is
written under a temporary name beside its destination and renamed only when complete, so a
full disk (ENOSPC), a read-only file system (EROFS) or a missing permission (EACCES) midway
leaves the previous good files as they were. This module holds the pieces that make that
so everywhere alike:

* :func:`writing` -- a block whose write errors become one :class:`WriteError` (a
  :class:`~llamatune.errors.UserError`: what could not be written, where, the OS reason in
  words, what to do), after removing the block's temporary files;
* :func:`write_text`, :func:`append_text`, :func:`publish` -- a text file replaced atomically,
  an append that is undone when it fails (no torn last row), a temporary folder's files moved
  into place;
* :func:`agree` -- under a launcher only the main process writes; the others learn that it
  failed and stop too, instead of waiting at the next collective for a process that is gone.

safetensors reports an I/O error as its own ``SafetensorError`` whose message holds
``(os error N)``; :func:`os_errno` reads the number from there as from an ``OSError``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path

from llamatune.errors import UserError

__all__ = ["WRITE_ERRNOS", "WriteError", "agree", "append_text", "describe", "os_errno",
           "publish", "reason", "remove", "write_text", "writing"]

_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission is denied",
    errno.EPERM: "the operation is not permitted",
    errno.EFBIG: "the file is larger than the file system allows",
}
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
WRITE_ERRNOS = frozenset(_REASONS)
"""The error numbers a write can meet that the user fixes (space, mounts, permissions)."""

_SAFETENSORS_ERRNO = re.compile(r"\(os error (\d+)\)")
_SAFETENSORS_PATH = re.compile(r'at path "([^"]+)"')


class WriteError(UserError):
    """A file could not be written; the message says what, where, why and what to do.

    Attributes:
        errno: The OS error number (``errno.ENOSPC``, ...).
    """

    def __init__(self, message: str, err: int):
        super().__init__(message)
        self.errno = err


def os_errno(exc: BaseException) -> int | None:
    """The OS error number behind ``exc`` (an ``OSError`` or safetensors' I/O error), if any."""
    if isinstance(exc, OSError):
        return exc.errno
    if type(exc).__name__ == "SafetensorError":
        m = _SAFETENSORS_ERRNO.search(str(exc))
        return int(m.group(1)) if m else None
    return None


def reason(err: int | None) -> str:
    """The OS error ``err`` in words (``"the disk is full"``)."""
    if err in _REASONS:
        return _REASONS[err]
    return os.strerror(err).lower() if err else "an unknown error"


def _failed_path(exc: BaseException) -> str | None:
    if isinstance(exc, OSError):
        return exc.filename
    m = _SAFETENSORS_PATH.search(str(exc))
    return m.group(1) if m else None


def describe(exc: BaseException) -> str | None:
    """A one-paragraph message for a write error no command translated, or ``None``.

    The CLI's last resort: a write the commands do not wrap (a plot, a tracker's file) that
    meets a full disk or a read-only folder still ends in words, not a traceback.
    """
    err = os_errno(exc)
    if err not in WRITE_ERRNOS:
        return None
    at = _failed_path(exc)
    return (f"{at or 'a file'}: {reason(err)} ({os.strerror(err)}). Free space, or fix the "
            "folder's permissions, or choose another place to write (output_dir, --out, "
            "--gguf).")


def remove(path: Path) -> None:
    """Remove a temporary file or folder if it is there (never raises)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def writing(what: str, where, fix: str, temporary=()):
    """Run a block of writes; on any failure remove ``temporary``; report write errors clearly.

    Args:
        what: What the block writes, for the message (``"checkpoint-40"``).
        where: The folder or file it goes to.
        fix: What else the user can do, after "Free space, or " (or "Make it writable,
            or "): ``"choose another output_dir."``.
        temporary: Paths the block creates and that must not outlive a failure.

    Raises:
        WriteError: The block met a write error (ENOSPC, EROFS, EACCES, ...). Other errors
            pass through unchanged (after the clean-up).
    """
    try:
        yield
    except BaseException as e:
        for p in temporary:
            remove(p)
        err = os_errno(e)
        if err not in WRITE_ERRNOS:
            raise
        at = _failed_path(e)
        detail = f"{os.strerror(err)}" + (f": {at}" if at else "")
        first = ("Free space" if err in _FULL else
                 "Make it writable (permissions, a read-only mount)")
        raise WriteError(
            f"could not write {what} to {where}: {reason(err)} ({detail}). What was there "
            f"before is untouched and the partial files were removed. {first}, or {fix}",
            err) from None


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (a temporary file beside it, then a rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def append_text(path: Path, text: str) -> None:
    """Append ``text`` to ``path`` and flush; a failed append is cut off, not left torn.

    A full disk can take part of the text. The file is truncated back to its length before
    the call, so earlier rows stay whole and readers never see half a row.
    """
    data = text.encode()
    with open(path, "ab", buffering=0) as f:  # unbuffered: nothing is left to flush at close
        size = f.seek(0, os.SEEK_END)
        try:
            done = 0
            while done < len(data):
                done += f.write(data[done:])
        except BaseException:
            with contextlib.suppress(OSError):
                f.truncate(size)
            raise


def publish(tmp: Path, dest: Path) -> None:
    """Move every file of the folder ``tmp`` into ``dest`` (each by an atomic rename); drop ``tmp``.

    The files were written completely beforehand, so the renames (within one file system)
    do not meet a full disk; a file of ``dest`` is replaced whole or not at all.
    """
    for f in sorted(Path(tmp).iterdir()):
        os.replace(f, Path(dest) / f.name)
    Path(tmp).rmdir()


def agree(error: WriteError | None) -> None:
    """Every process stops when the main one could not write (a no-op alone).

    Call it on every process right after the main process's write. The main process
    raises its error; the others exit with status 2 and say nothing more (the main process
    prints the one message), rather than meeting a vanished peer at the next collective.

    Raises:
        WriteError: On the process that failed.
        SystemExit: On the others, when the main process failed.
    """
    from llamatune import dist

    failed = error is not None
    if dist.world().size > 1:
        failed = dist.all_sum([1.0 if failed else 0.0])[0] > 0
    if error is not None:
        raise error
    if failed:
        raise SystemExit(2)
