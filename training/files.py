"""Writing files so that a crash, a kill or a full disk never leaves half of one behind."""
import contextlib
import io
import os
import tempfile
import time
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt


def atomic_save(obj, path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename it over ``path``.

    Readers see either the old file or the complete new one, never a part. Raises OSError (with the
    temporary file removed) when the folder cannot be written or the disk is full.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # serialise first, so that a failed write is a plain OSError
    atomic_write(buffer.getbuffer(), path)


def atomic_write(data, path) -> None:
    """Write the bytes ``data`` to ``path`` as atomic_save does: a temporary file, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        if hasattr(os, 'fchmod'):  # (not on Windows before Python 3.13)
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:
        pass  # some file systems cannot fsync a folder; the data itself is already on disk


@contextlib.contextmanager
def one_at_a_time(path):
    """Hold an exclusive lock on the file ``path`` (made if missing), waiting for whoever holds it: so that
    of several processes (train_ddp.py's, or two runs) one downloads or decodes the data and the others then
    find it done. Without a writable folder, no lock: the work is done anyway."""
    try:
        lock = open(path, 'a+')
    except OSError:
        yield
        return
    with lock:
        lock_file(lock, wait=True)
        yield  # closing the file releases the lock


def lock_file(f, wait: bool) -> None:
    """An exclusive lock on the open file ``f``, which the operating system drops when the file is closed or
    the process ends (even by kill -9). ``wait``: until it is free; else OSError at once when it is taken."""
    if fcntl:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return
    f.seek(1 << 20)  # Windows locks bytes: one past any text the file holds, so that the text stays readable
    while True:
        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)
            return
        except OSError:  # taken (LK_LOCK gives up after 10 s)
            if not wait:
                raise
            time.sleep(1)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
