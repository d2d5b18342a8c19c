"""Run a script as ``__main__`` with traits of another platform reproduced on this one (for the tests):

    python tests/launch.py [--start-method spawn] [--windows-files] SCRIPT ARGS...

--start-method   how multiprocessing starts DataLoader workers: ``spawn`` is Windows' and macOS's way
                 (a new Python that imports everything again), ``fork`` Linux's (before Python 3.14)
--windows-files  no ``fcntl`` (the project then locks files with ``msvcrt``, Windows' byte-range locks, stood
                 in for here by POSIX record locks with msvcrt's behaviour) and no ``os.fchmod`` (as on
                 Windows before Python 3.13)
"""
import multiprocessing
import os
import runpy
import sys
import time
import types


def windows_files() -> None:
    import fcntl
    import getpass  # noqa: F401  (these two take Windows' paths wherever msvcrt imports: in first, as they are)
    import subprocess  # noqa: F401

    def locking(fd: int, mode: int, nbytes: int) -> None:
        """msvcrt.locking: lock ``nbytes`` from the current position; LK_NBLCK fails at once when they are taken,
        LK_LOCK tries 10 times a second apart, then fails; LK_UNLCK unlocks. A failure is an OSError."""
        start = os.lseek(fd, 0, os.SEEK_CUR)
        if mode == stand_in.LK_UNLCK:
            fcntl.lockf(fd, fcntl.LOCK_UN, nbytes, start)
            return
        for attempt in range(10 if mode == stand_in.LK_LOCK else 1):
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, nbytes, start)
                return
            except OSError:
                if attempt < 9 and mode == stand_in.LK_LOCK:
                    time.sleep(1)
        raise PermissionError(13, 'Permission denied')

    stand_in = types.ModuleType('msvcrt')
    stand_in.LK_UNLCK, stand_in.LK_LOCK, stand_in.LK_NBLCK = 0, 1, 2
    stand_in.locking = locking
    sys.modules['msvcrt'] = stand_in
    sys.modules['fcntl'] = None  # `import fcntl` now raises ImportError, as on Windows
    del os.fchmod


if __name__ == '__main__':
    args = sys.argv[1:]
    if args[0] == '--start-method':
        multiprocessing.set_start_method(args[1])
        args = args[2:]
    if args[0] == '--windows-files':
        windows_files()
        args = args[1:]
    sys.argv = args
    sys.path[0] = os.path.dirname(os.path.abspath(args[0]))  # as `python SCRIPT` has it
    runpy.run_path(args[0], run_name='__main__')
