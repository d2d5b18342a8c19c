"""Where the project's own folders are, and how a path or a command is shown so that it can be pasted back.

The default folders -- ``dataset/``, ``model/``, ``logs/`` and ``images/`` -- are the ones beside the scripts,
whatever folder the scripts are started from (a VS Code workspace root, an Anaconda Prompt in the home folder,
``python 项目/train.py``). They are given as the learner would type them from where they stand: relative to the
current folder when they lie below it (``model``, or ``项目/model``), else in full. A path given on the command
line is taken as given.
"""
import os
import re
from pathlib import Path

from .platforms import WINDOWS

PROJECT_DIR = Path(__file__).resolve().parent.parent


def project_path(*parts: str) -> Path:
    """A file or folder of the project (``project_path('model')``), as it is reached from the current folder."""
    return shown(PROJECT_DIR.joinpath(*parts))


def is_project_path(path, *parts: str) -> bool:
    """``path`` names the project's own ``parts`` (however it is written)."""
    return Path(os.path.abspath(path)) == Path(os.path.abspath(PROJECT_DIR.joinpath(*parts)))


def shown(path) -> Path:
    """``path`` relative to the current folder when it lies below it, else unchanged."""
    path = Path(path)
    if path.is_absolute():
        try:
            return path.relative_to(Path.cwd())
        except ValueError:
            pass
    return path


# characters a POSIX shell reads as part of a plain word (letters of any script included)
_PLAIN_POSIX = re.compile(r'[\w@%+=:,./-]+')
# characters after which cmd.exe or PowerShell would split or reinterpret an unquoted argument
_SPECIAL_WINDOWS = set(' \t&()[]{}^=;!\'+,`~<>|$@#')


def quoted(argument, windows: bool = None) -> str:
    """``argument`` as it must be typed in the learner's shell to arrive unchanged: in double quotes for cmd.exe
    and PowerShell (``windows``, the default on Windows), in single quotes for POSIX shells, when it needs any."""
    text = str(argument)
    if windows if windows is not None else WINDOWS:
        return f'"{text}"' if not text or any(c in _SPECIAL_WINDOWS for c in text) else text
    if text and _PLAIN_POSIX.fullmatch(text):
        return text
    return "'" + text.replace("'", "'\"'\"'") + "'"


def command(*words) -> str:
    """A command line that works when pasted: ``command('python', script, '--resume')``."""
    return ' '.join(quoted(w) for w in words)
