"""Writing files so that a crash, a kill or a full disk never leaves half of one behind."""
import contextlib
import io
import os
import tempfile
from pathlib import Path

import torch

from .platforms import lock_file, replace_file, set_permissions


def atomic_save(obj, path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename it over ``path``.

    Readers see either the old file or the complete new one, never a part. Raises OSError (with the
    temporary file removed) when the folder cannot be written or the disk is full, and platforms.FileInUse
    when another program holds ``path`` open for seconds (Windows refuses to replace it meanwhile).
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
        set_permissions(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        replace_file(tmp, path)
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
