"""What differs between Windows, macOS, Linux and notebooks, in one place: each helper says which platform
needs what, and why. The scripts and the other helpers call these and never test the platform themselves.

- consoles: Windows consoles, IDE consoles, pipes and files may use a code page (cp1252, GBK, ascii) that
  lacks some characters of a class or file name;
- files: Windows locks files with ``msvcrt`` instead of ``fcntl``, has no ``os.fchmod`` (before Python 3.13),
  and refuses to replace a file that another program holds open (an antivirus scan, OneDrive);
- processes: Ctrl+C reaches DataLoader workers too (a terminal signals the whole process group, a Windows
  console every process attached to it), and Windows and macOS start them by spawning a new Python;
- notebooks: a kernel's ``sys.argv`` holds the kernel's own arguments, and its output is no terminal;
- GPUs and compilers: Windows builds of PyTorch have no NCCL; ``torch.compile`` needs Triton on a GPU and a C++
  compiler on the CPU, which many machines (most Windows ones) lack;
- the NVIDIA driver, seen without PyTorch (``nvidia-smi``, the driver's library), to name a CPU-only build;
- fonts that draw Chinese, where each system keeps them.
"""
import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

WINDOWS = os.name == 'nt'
MACOS = sys.platform == 'darwin'

# ---------------------------------------------------------------- consoles


def prepare_console() -> None:
    """Every line written at once (a pipe or a notebook would keep it in a buffer of several kilobytes), and
    a character the console's encoding cannot show written as a backslash escape (``\\u732b``) instead of
    stopping the run with a UnicodeEncodeError: a cp1252 or ascii console, or GBK with an emoji or Hangul."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, 'reconfigure'):  # (a notebook's or a test's stream has its own rules)
            stream.reconfigure(errors='backslashreplace', line_buffering=True)


def can_show(text: str, stream=None) -> bool:
    """True when ``stream`` (default: stdout) can encode ``text`` as it is."""
    encoding = getattr(stream or sys.stdout, 'encoding', None) or 'utf-8'
    try:
        text.encode(encoding)
        return True
    except (UnicodeEncodeError, LookupError):
        return False


def release_stdout() -> None:
    """After the reader of stdout went away: point it at the null device, so that Python's last flush does
    not fail a second time (a notebook's stdout has no file descriptor, and needs nothing)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # (io.UnsupportedOperation is both of the first two)
        pass


# ---------------------------------------------------------------- files

# How long a rename waits for another program to let go of the file it replaces (Windows only refuses it).
# Antivirus scanners and sync tools hold a new file for well under a second.
REPLACE_PATIENCE = 5.0


class FileInUse(PermissionError):
    """A file could not be replaced for ``REPLACE_PATIENCE`` seconds: another program holds it open."""


def replace_file(source, target) -> None:
    """``os.replace``, retried while the target is refused (on Windows: held open by another program); then
    FileInUse."""
    deadline, pause = time.monotonic() + REPLACE_PATIENCE, 0.02
    while True:
        try:
            os.replace(source, target)
            return
        except PermissionError as e:
            if time.monotonic() >= deadline:
                raise FileInUse(e.errno, e.strerror, str(target)) from None
            time.sleep(pause)
            pause = min(pause * 2, 0.5)


def set_permissions(fd: int, mode: int) -> None:
    """chmod of an open file; Windows before Python 3.13 has no os.fchmod (and no such permissions)."""
    if hasattr(os, 'fchmod'):
        os.fchmod(fd, mode)


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


# ---------------------------------------------------------------- processes


@contextlib.contextmanager
def workers_start_deaf():
    """Around the start of DataLoader workers: Ctrl+C stays blocked in the processes started meanwhile (a
    blocked signal's mask is inherited through fork and spawn alike) until ``ignore_interrupts`` runs in
    them, and is delivered to this process once they are started. Windows has no signal masks: there the
    workers ignore Ctrl+C from ``ignore_interrupts`` on."""
    if not hasattr(signal, 'pthread_sigmask'):
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def ignore_interrupts(worker_id: int = 0) -> None:
    """A DataLoader worker's ``worker_init_fn``: Ctrl+C, which a terminal sends to every process of the job,
    is for the main process, which stops training after the step and saves; a worker that died of it would
    break the DataLoader first (and print its own traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, 'pthread_sigmask'):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a Ctrl+C that came meanwhile is dropped


def available_memory() -> int:
    """Bytes of memory free for the data: Linux says so; macOS and Windows do not say it the same way, so a
    few GB are assumed there (a CIFAR-10-sized data set needs 180 MB)."""
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
        return 4 << 30


# ---------------------------------------------------------------- notebooks

KERNEL_LAUNCHERS = ('ipykernel_launcher.py', 'colab_kernel_launcher.py', 'ipykernel_launcher')
KERNEL_FILE = re.compile(r'(--f=|-f=)?.*kernel-[\w.-]*\.json')


def script_arguments() -> list:
    """The command line's arguments: ``sys.argv[1:]``, except in a notebook kernel (Jupyter, Colab, VS Code),
    whose ``sys.argv`` holds the kernel's own (``-f .../kernel-1234.json``): a ``main()`` called from a cell
    then starts from the defaults (``main(['--epochs', '1'])`` passes flags). ``%run train.py --epochs 1``
    sets sys.argv as a command line does, and is taken as one."""
    argv = sys.argv[1:]
    if sys.argv and (Path(sys.argv[0]).name in KERNEL_LAUNCHERS or any(KERNEL_FILE.fullmatch(a) for a in argv)):
        return []
    return argv


def in_notebook() -> bool:
    """Running in a Jupyter or Colab kernel (whose output is shown in the notebook, not in a terminal)."""
    ipython = sys.modules.get('IPython')
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, 'get_ipython') else None
    return shell is not None and hasattr(shell, 'kernel')


def progress_bar_class():
    """tqdm's notebook bar where a notebook can draw it (ipywidgets installed), else the text bar, which a
    terminal, Jupyter and Colab all redraw in place."""
    if in_notebook():
        import importlib.util
        if importlib.util.find_spec('ipywidgets') is not None:
            from tqdm.notebook import tqdm
            return tqdm
    from tqdm import tqdm
    return tqdm


def shows_progress() -> bool:
    """Whether a progress bar belongs in the output: a terminal or a notebook (not a file, pipe or CI log)."""
    return in_notebook() or sys.stderr.isatty()


def progress_stream():
    """Where the text bar goes: stderr in a terminal; stdout in a notebook, which shows stderr as errors."""
    return sys.stdout if in_notebook() else sys.stderr


# ---------------------------------------------------------------- GPUs and compilers


def process_group_backend(cuda: bool) -> tuple:
    """(backend, note): NCCL between GPUs where PyTorch has it; gloo on the CPU, and between GPUs on Windows,
    whose builds of PyTorch come without NCCL (the note says so once)."""
    import torch.distributed as dist
    if not cuda:
        return 'gloo', None
    if dist.is_nccl_available():
        return 'nccl', None
    return 'gloo', ('note: this PyTorch has no NCCL (Windows builds have none), so the GPUs exchange their '
                    'gradients through gloo, which is slower; under torchrun on Windows set USE_LIBUV=0')


def compile_problem(device_type: str):
    """Why ``torch.compile`` cannot work here, or None: on an NVIDIA GPU it needs Triton (not part of the Windows
    builds of PyTorch); on the CPU a C++ compiler (g++ or clang++; on Windows Visual Studio's cl.exe, from a
    Developer Command Prompt), which torch.compile looks for as ``CXX``."""
    import importlib.util
    if device_type == 'cuda' and importlib.util.find_spec('triton') is None:
        return ('torch.compile on an NVIDIA GPU needs Triton, which this PyTorch install lacks'
                + (' (on Windows: pip install triton-windows)' if WINDOWS else ' (pip install triton)'))
    if device_type == 'cpu':
        compiler = os.environ.get('CXX') or ('cl' if WINDOWS else 'clang++' if MACOS else 'g++')
        if shutil.which(compiler) is None:
            where = ("Visual Studio's C++ build tools, and start from a Developer Command Prompt" if WINDOWS else
                     'the Xcode command line tools: xcode-select --install' if MACOS else 'g++ (e.g. apt install g++)')
            return f'torch.compile on the CPU needs a C++ compiler, and {compiler} was not found (install {where})'
    return None


@functools.lru_cache(maxsize=1)
def nvidia_gpu():
    """What the NVIDIA driver says of this machine's GPUs, seen without PyTorch: {'names': [...], 'driver':
    '551.86', 'cuda': (12, 4)} (the newest CUDA the driver runs), from ``nvidia-smi``; {} when only the driver's
    library is there; None when there is no sign of an NVIDIA GPU."""
    smi = shutil.which('nvidia-smi')
    if smi is None and WINDOWS:  # older drivers put it here, off the PATH
        old = Path(os.environ.get('ProgramFiles', r'C:\Program Files'), 'NVIDIA Corporation', 'NVSMI', 'nvidia-smi.exe')
        smi = str(old) if old.is_file() else None
    if smi:
        try:
            text = subprocess.run([smi], capture_output=True, text=True, timeout=15, errors='replace').stdout
        except (OSError, subprocess.SubprocessError):
            text = ''
        found = parse_nvidia_smi(text)
        if found:
            return found
    if driver_library_present():
        return {}
    return None


def parse_nvidia_smi(text: str):
    """The GPU names, driver version and CUDA version in ``nvidia-smi``'s table, or None."""
    driver = re.search(r'Driver Version:\s*([\d.]+)', text)
    cuda = re.search(r'CUDA Version:\s*(\d+)\.(\d+)', text)
    if not driver:
        return None
    names = re.findall(r'^\|\s*\d+\s+(.+?)(?:\s*\.\.\.)?\s{2,}(?:On|Off|WDDM|TCC)\b', text, flags=re.MULTILINE)
    return {'names': names, 'driver': driver[1], 'cuda': (int(cuda[1]), int(cuda[2])) if cuda else None}


def driver_library_present() -> bool:
    """The NVIDIA driver's CUDA library is installed: nvcuda.dll on Windows, /proc/driver/nvidia on Linux."""
    if WINDOWS:
        return Path(os.environ.get('SystemRoot', r'C:\Windows'), 'System32', 'nvcuda.dll').is_file()
    return Path('/proc/driver/nvidia/version').is_file()


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: asked of PyTorch where it can tell (every platform), else of Linux's /proc/cpuinfo;
    elsewhere no."""
    import torch
    cpu = getattr(torch._C, '_cpu', None)
    probes = [getattr(cpu, name, None) for name in ('_is_avx512_bf16_supported', '_is_amx_tile_supported')]
    if all(callable(p) for p in probes):
        return any(p() for p in probes)
    try:
        flags = Path('/proc/cpuinfo').read_text().split()
    except OSError:
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


# ---------------------------------------------------------------- fonts

# Fonts that hold Chinese characters, where each system keeps them (the first one found is used).
CJK_FONTS = {
    'windows': ['msyh.ttc', 'msyh.ttf', 'simhei.ttf', 'simsun.ttc', 'Deng.ttf'],  # in %WINDIR%\\Fonts
    'macos': ['/System/Library/Fonts/PingFang.ttc', '/System/Library/Fonts/STHeiti Medium.ttc',
              '/System/Library/Fonts/STHeiti Light.ttc', '/System/Library/Fonts/Hiragino Sans GB.ttc',
              '/Library/Fonts/Arial Unicode.ttf'],
    'linux': ['/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc',
              '/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc',
              '/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc',
              '/usr/share/fonts/truetype/wqy/wqy-microhei.ttc', '/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc',
              '/usr/share/fonts/wenquanyi/wqy-microhei/wqy-microhei.ttc',
              '/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf',
              '/usr/share/fonts/truetype/arphic/uming.ttc'],
}


def cjk_font_candidates() -> list:
    """Paths of fonts that draw Chinese, where this system keeps them (not all need exist); on Linux also
    what fontconfig knows of (``fc-list :lang=zh``)."""
    if WINDOWS:
        folder = Path(os.environ.get('WINDIR', r'C:\Windows'), 'Fonts')
        return [str(folder / name) for name in CJK_FONTS['windows']]
    if MACOS:
        return CJK_FONTS['macos']
    found = []
    if shutil.which('fc-list'):
        try:
            listing = subprocess.run(['fc-list', ':lang=zh', 'file'], capture_output=True, text=True, timeout=10,
                                     errors='replace').stdout
            found = sorted(line.strip().rstrip(':') for line in listing.splitlines() if line.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    return CJK_FONTS['linux'] + found
