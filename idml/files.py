"""Atomic file writes: every file the project writes goes to a temporary name in the same
folder first and is renamed over the target, so a crash never leaves a truncated file."""

import contextlib
import fcntl
import glob
import os
import tempfile
from collections.abc import Callable

from idml.errors import UsageError

TEMPORARY_PATTERN = ".*.*.tmp"  # the names atomic_write's temporary files take: .<name>.<random>.tmp


def atomic_write(path: str, write: Callable[[object], None], mode: str = "wb") -> None:
    """Call write(f) on a temporary file beside `path`, fsync it, then rename it to `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{path} is a folder; expected the name of a file to write")
    try:  # a file where a folder should be, no permission: the user's path, said in one line
        os.makedirs(folder, exist_ok=True)
        handle, tmp_path = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"cannot write {path}: part of its folder path is a file, not a folder") from None
    except OSError as error:
        raise UsageError(f"cannot write {path} ({error.strerror})") from None
    try:
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from other users
        with os.fdopen(handle, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: str) -> int:
    """Removes the temporary files atomic_write left in `folder` (a process killed while
    writing cannot remove its own); call it only while no other process writes there.
    Returns how many it removed."""
    removed = 0
    for path in glob.glob(os.path.join(glob.escape(folder), TEMPORARY_PATTERN)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed += 1
    return removed


class FolderLock:
    """An exclusive flock on `folder`/.lock for as long as it is held (the kernel releases it
    when the process ends, however it ends); UsageError when another process holds it."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK_NAME)
        self.file = open(self.path, "a")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise UsageError(
                f"{folder} is in use by another run (which holds its {LOCK_NAME}): two runs writing "
                f"there would overwrite each other's checkpoints; wait until that run ends"
            ) from None

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


LOCK_NAME = ".lock"
