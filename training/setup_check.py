"""``python train.py --dry-run``, first part: what a learner would otherwise ask about -- Python, PyTorch and
its build, the GPU and its driver, Apple's GPU, bf16, where the data is looked for, whether the folders can be
written, the console -- and each problem found, with its fix, in English and in Chinese. Then the dry run.

    print(setup_report(args, device))     # the report: one line per item, then the problems
    setup_problems(args)                  # the problems alone: [(English, Chinese), ...]
"""
import os
import platform
import sys
import tempfile
import importlib
from pathlib import Path

import torch

from .data import CIFAR10
from .device import Autocast, gpu_problem, gpu_problem_text, has_native_bf16
from .paths import project_path
from .platforms import MACOS, can_show, nvidia_gpu

OLDEST_PYTHON = (3, 9)
OLDEST_TORCH = (2, 6)  # as requirements.txt says


def version_of(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except (ImportError, AttributeError):
        return 'not installed'


def release(version: str) -> tuple:
    """'2.6.0+cu126' -> (2, 6)."""
    numbers = [int(part) for part in version.split('+')[0].split('.')[:2] if part.isdigit()]
    return tuple(numbers)


def bits() -> str:
    return platform.architecture()[0].replace('bit', '-bit')  # '64-bit'


def torch_build() -> str:
    if torch.version.cuda:
        return f'CUDA {torch.version.cuda} build'
    if getattr(torch.version, 'hip', None):
        return f'ROCm {torch.version.hip} build'
    return 'CPU-only build' + (' (with Apple GPU support)' if torch.backends.mps.is_built() else '')


def gpu_line() -> str:
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        capability = torch.cuda.get_device_capability(0)
        gpu = nvidia_gpu() or {}
        driver = f', driver {gpu["driver"]}' if gpu.get('driver') else ''
        return f'{", ".join(names)} (compute capability {capability[0]}.{capability[1]}{driver}); CUDA works'
    gpu = nvidia_gpu()
    if gpu is None:
        return 'none seen (no nvidia-smi, no NVIDIA driver)'
    problem = gpu_problem()
    what = ', '.join(gpu.get('names') or []) or 'an NVIDIA driver'
    driver = f', driver {gpu["driver"]}' if gpu.get('driver') else ''
    return f'{what}{driver}; CUDA does not work ({problem["kind"] if problem else "see below"})'


def mps_line() -> str:
    if torch.backends.mps.is_available():
        return 'available: train_gpu_2.py trains on it'
    if MACOS:
        return ('not available (it needs macOS 12.3 or newer, and a PyTorch with MPS)' if torch.backends.mps.is_built()
                else 'not available: this PyTorch was built without it')
    return 'no (not a Mac)'


def data_line(data_dir: Path) -> str:
    batches = data_dir / CIFAR10.base_folder
    if (data_dir / 'train').is_dir() or (data_dir / 'test').is_dir():
        return f'image folders in {data_dir}/ (train/, test/)'
    if (batches / 'data_batch_1').is_file():
        return f'found: {batches}/'
    if (data_dir / CIFAR10.filename).is_file():
        return f'{data_dir / CIFAR10.filename} found: unpacked on the first run'
    return (f'not in {data_dir}/ yet: the first run downloads it (163 MB from {CIFAR10.url.split("/")[2]}); '
            f'offline: put {CIFAR10.filename} there by hand')


def unwritable(folder: Path):
    """Why ``folder`` (made if missing) cannot take this project's files, or None."""
    if folder.exists() and not folder.is_dir():
        return 'a file of that name is in the way'
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix='.write-test-')
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return e.strerror or str(e)
    return None


def real_folders(args) -> list:
    """The folders a real run of these settings reads and writes (a dry run itself writes to scratch ones)."""
    return [Path(args.data_dir), project_path('model'), project_path('logs')]


def setup_problems(args, unwritable_folders: dict = None) -> list:
    """Every problem found, as (English, Chinese): each says what is wrong and how to fix it.
    ``unwritable_folders``: {folder: why} when the caller has looked already (see folder_problems)."""
    problems = []
    if sys.version_info[:2] < OLDEST_PYTHON or sys.maxsize <= 2 ** 32:
        problems.append((f'Python {platform.python_version()} ({bits()}): this project needs a '
                         f'64-bit Python {OLDEST_PYTHON[0]}.{OLDEST_PYTHON[1]} or newer; install one from python.org',
                         f'Python {platform.python_version()}（{bits()}）：本项目需要 64 位的 Python '
                         f'{OLDEST_PYTHON[0]}.{OLDEST_PYTHON[1]} 或更新版本，请从 python.org 安装'))
    if release(torch.__version__) < OLDEST_TORCH:
        problems.append((f'PyTorch {torch.__version__} is older than {OLDEST_TORCH[0]}.{OLDEST_TORCH[1]}, the oldest '
                         f'this project supports: python -m pip install -r requirements.txt',
                         f'PyTorch {torch.__version__} 比本项目支持的最低版本 {OLDEST_TORCH[0]}.{OLDEST_TORCH[1]} 旧：'
                         f'运行 python -m pip install -r requirements.txt'))
    problem = gpu_problem()
    if problem:
        problems.append((gpu_problem_text(problem), gpu_problem_text(problem, chinese=True)))
    folders = folder_problems(args) if unwritable_folders is None else unwritable_folders
    for folder, why in folders.items():
        problems.append((f'{folder}/ cannot be written ({why}): move the project to a folder of your own '
                         f'(not C:\\Program Files or a read-only drive), or give --data-dir, --checkpoint-dir '
                         f'and --log-dir',
                         f'{folder}/ 无法写入（{why}）：把项目放到自己的文件夹里（不要放在 C:\\Program Files 或只读的盘上），'
                         f'或者用 --data-dir、--checkpoint-dir、--log-dir 指定别的文件夹'))
    if not can_show('猫'):
        encoding = getattr(sys.stdout, 'encoding', None)
        problems.append((f'this console\'s encoding ({encoding}) cannot show Chinese: class names come out as \\u '
                         f'escapes; set PYTHONIOENCODING=utf-8 (or use Windows Terminal, or PyCharm\'s UTF-8 console)',
                         f'控制台编码（{encoding}）无法显示中文，类别名会显示成 \\u 转义；设置环境变量 PYTHONIOENCODING=utf-8'
                         f'（或使用 Windows Terminal、把 PyCharm 控制台设为 UTF-8）'))
    return problems


def folder_problems(args) -> dict:
    """{folder: why} for each folder of real_folders that cannot be written."""
    found = {folder: unwritable(folder) for folder in real_folders(args)}
    return {folder: why for folder, why in found.items() if why}


def setup_report(args, device) -> str:
    """The lines the dry run starts with (see the module's docstring)."""
    unwritable_folders = folder_problems(args)
    problems = setup_problems(args, unwritable_folders)
    rows = [
        ('Python', f'{platform.python_version()} ({bits()}) on {platform.system()} {platform.machine()}'),
        ('PyTorch', f'{torch.__version__}, {torch_build()}; torchvision {version_of("torchvision")}, '
                    f'Pillow {version_of("PIL")}, TensorBoard {version_of("tensorboard")}'),
        ('NVIDIA GPU', gpu_line()),
        ('Apple GPU', mps_line()),
        ('training on', str(device)),
        ('precision', f'--precision auto: {Autocast("auto", device).name} on this {device.type} '
                      f'({"native bf16" if has_native_bf16(device) else "no native bf16"})'),
        ('CIFAR-10', data_line(Path(args.data_dir))),
        ('folders', ', '.join(f'{folder}/' for folder in real_folders(args)) +
         (' cannot all be written (see below)' if unwritable_folders else ' writable')),
        ('console', f'{getattr(sys.stdout, "encoding", None) or "?"}'),
    ]
    lines = ['setup check (环境检查):'] + [f'  {name:<12} {value}' for name, value in rows]
    if not problems:
        lines.append('  problems     none (没有发现问题)')
    for number, (english, chinese) in enumerate(problems, start=1):
        lines += [f'  problem {number}: {english}', f'  问题 {number}：{chinese}']
    return '\n'.join(lines)
