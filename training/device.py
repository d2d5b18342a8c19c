"""Choosing the device, and the fast paths it offers (bf16, channels_last, cuDNN autotuning, compiling)."""
import contextlib
import os

import torch

from .errors import UserError
from .platforms import compile_problem, cpu_has_native_bf16, nvidia_gpu


# PyTorch's CUDA builds (its install selector, pytorch.org/get-started/locally) and the driver each needs:
# the newest one the driver runs is the one to install
CUDA_BUILDS = [((13, 0), 'cu130'), ((12, 8), 'cu128'), ((12, 6), 'cu126')]


# What keeps an NVIDIA GPU from being used, and the fix: (English, Chinese), for gpu_problem()'s kinds
GPU_PROBLEMS = {
    'cpu-only build': (
        'this PyTorch ({torch}) is a CPU-only build, but this machine has an NVIDIA GPU ({gpu}); to train on it, '
        'install the CUDA build: {first}{fix}',
        '当前安装的 PyTorch（{torch}）是只能用 CPU 的版本，但这台电脑有 NVIDIA 显卡（{gpu}）；要用显卡训练，请安装 CUDA 版：'
        '{first}{fix}'),
    'old driver': (
        'the NVIDIA driver ({gpu}) is older than the CUDA {built} this PyTorch was built for: update the driver, '
        'or install the build for your CUDA: {first}{fix}',
        'NVIDIA 显卡驱动（{gpu}）比这个 PyTorch 所用的 CUDA {built} 旧：请更新驱动，或安装与驱动相符的版本：{first}{fix}'),
    'hidden': (
        'CUDA_VISIBLE_DEVICES={hidden} hides the NVIDIA GPU ({gpu}) from PyTorch; unset it to use the GPU',
        '环境变量 CUDA_VISIBLE_DEVICES={hidden} 让 PyTorch 看不到显卡（{gpu}）；删掉这个变量就能用显卡'),
    'not started': (
        'this machine has an NVIDIA GPU ({gpu}) but CUDA did not start; run nvidia-smi to see whether the driver '
        'works, and reinstall the driver if it does not',
        '这台电脑有 NVIDIA 显卡（{gpu}），但 CUDA 没有启动；运行 nvidia-smi 看驱动是否正常，不正常就重装驱动'),
}
UPDATE_FIRST = ('update the NVIDIA driver first (it runs CUDA {driver}; PyTorch needs {oldest} or newer), then ',
                '先更新显卡驱动（它支持 CUDA {driver}，PyTorch 需要 {oldest} 或更新），然后运行 ')


def version_text(version: tuple) -> str:
    return '.'.join(map(str, version))


def describe_gpu(gpu: dict) -> str:
    names = ', '.join(gpu.get('names') or []) or 'NVIDIA'
    driver = f', driver {gpu["driver"]}' if gpu.get('driver') else ''
    cuda = f', CUDA {version_text(gpu["cuda"])}' if gpu.get('cuda') else ''
    return f'{names}{driver}{cuda}'


def gpu_problem():
    """What keeps this machine's NVIDIA GPU from being used (a dict: 'kind', a key of GPU_PROBLEMS, and the
    details), or None when CUDA works or there is no NVIDIA GPU. The common case: ``pip install torch`` on
    Windows installs a CPU-only build, which trains on the CPU however good the GPU is, and says nothing."""
    if torch.cuda.is_available():
        return None
    gpu = nvidia_gpu()
    if gpu is None:
        return None
    driver_cuda = gpu.get('cuda')
    build = next((name for needs, name in CUDA_BUILDS if driver_cuda is None or driver_cuda >= needs), None)
    details = {'gpu': describe_gpu(gpu), 'torch': torch.__version__, 'built': torch.version.cuda,
               'hidden': repr(os.environ.get('CUDA_VISIBLE_DEVICES')), 'update_first': build is None,
               'driver': version_text(driver_cuda) if driver_cuda else '?',
               'oldest': version_text(CUDA_BUILDS[-1][0]),
               'fix': 'python -m pip install --force-reinstall torch torchvision --index-url '
                      f'https://download.pytorch.org/whl/{build or CUDA_BUILDS[-1][1]}'}
    if torch.version.cuda is None:
        return {'kind': 'cpu-only build', **details}
    if driver_cuda and driver_cuda < tuple(int(x) for x in torch.version.cuda.split('.')[:2]):
        return {'kind': 'old driver', **details}
    if os.environ.get('CUDA_VISIBLE_DEVICES') is not None:
        return {'kind': 'hidden', **details}
    return {'kind': 'not started', **details}


def gpu_problem_text(problem: dict, chinese: bool = False) -> str:
    """The problem and its fix, in one line (in Chinese with ``chinese``)."""
    first = UPDATE_FIRST[chinese].format(**problem) if problem['update_first'] else ''
    return GPU_PROBLEMS[problem['kind']][chinese].format(first=first, **problem)


def unusable_gpu():
    """Why this machine's NVIDIA GPU cannot be used, with the fix, or None (see gpu_problem)."""
    problem = gpu_problem()
    return gpu_problem_text(problem) if problem else None


def why_no_cuda() -> str:
    """In a few words, why CUDA is not available here (the GPU that cannot be used, with the fix, first)."""
    problem = unusable_gpu()
    if problem:
        return problem
    if torch.backends.mps.is_available():
        return "no NVIDIA GPU on a Mac; train_gpu_2.py trains on this Mac's own GPU (mps)"
    if torch.version.cuda is None:
        return 'no NVIDIA GPU here, and this PyTorch is a CPU-only build'
    return 'no NVIDIA GPU or driver found'


def device_note(device: torch.device) -> str:
    """What to add to 'training device: cpu' when an NVIDIA GPU sits unused beside it ('' otherwise)."""
    if device.type != 'cpu':
        return ''
    problem = unusable_gpu()
    return f' -- not the GPU: {problem}' if problem else ''


def select_device(name: str = 'auto') -> torch.device:
    """'auto' -> cuda if there is an NVIDIA GPU, else mps (Apple GPU), else cpu."""
    cuda_ok = torch.cuda.is_available()
    mps_ok = torch.backends.mps.is_available()
    if name == 'auto':
        name = 'cuda' if cuda_ok else 'mps' if mps_ok else 'cpu'
    elif name == 'cuda' and not cuda_ok:
        raise UserError(f'--device cuda: CUDA is not available here: {why_no_cuda()}; or use --device cpu')
    elif name == 'mps' and not mps_ok:
        raise UserError('--device mps: Apple MPS is not available here; use --device auto or --device cpu')
    elif name not in ('cpu', 'cuda', 'mps'):
        raise UserError(f'unknown device {name!r}: use auto, cpu, cuda or mps')
    return torch.device(name)


def has_native_bf16(device: torch.device) -> bool:
    """bf16 pays off only where the hardware computes it natively; emulated, it is slower than fp32."""
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == 'cpu':
        return cpu_has_native_bf16()
    return False


def has_fast_fp16(device: torch.device) -> bool:
    """NVIDIA GPUs from Volta on (compute capability 7.0: V100, T4, the GTX 16 and RTX 20 series ...) and the
    P100 (6.0) compute fp16 fast. Other Pascal cards (6.1: the GTX 10 series) do fp16 at a small fraction of
    their fp32 speed, so they stay in fp32."""
    if device.type != 'cuda':
        return False
    capability = torch.cuda.get_device_capability(device)
    return capability >= (7, 0) or capability == (6, 0)


def autocast_dtype(precision: str, device: torch.device):
    """torch.bfloat16 or torch.float16 when autocast should run, None for plain fp32. auto: bf16 where the
    hardware does it natively, else fp16 on GPUs that do fp16 fast (with a gradient scaler), else fp32."""
    if precision == 'auto':
        precision = 'bf16' if has_native_bf16(device) else 'fp16' if has_fast_fp16(device) else 'fp32'
    if precision == 'fp32':
        return None
    if device.type not in ('cuda', 'cpu'):
        raise UserError(f'--precision {precision} is not supported on {device.type}; use --precision fp32')
    return torch.bfloat16 if precision == 'bf16' else torch.float16


class Autocast:
    """``with autocast():`` -- bf16 or fp16 autocast for the forward pass and the loss where it pays off,
    else nothing. ``dtype`` is torch.bfloat16, torch.float16 or None (fp32)."""

    def __init__(self, precision: str, device: torch.device):
        self.dtype, self.device_type = autocast_dtype(precision, device), device.type

    def __call__(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def name(self) -> str:
        names = {torch.bfloat16: 'bf16 autocast', torch.float16: 'fp16 autocast + gradient scaling'}
        return names.get(self.dtype, 'fp32')

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16's gradients can underflow to 0: the scaler multiplies the loss before backward() and divides the
        gradients after, skipping the steps whose gradients overflowed. Under bf16 and fp32 it does nothing:
        ``scaler.scale(loss)`` is ``loss`` and ``scaler.step(optimizer)`` is ``optimizer.step()``."""
        enabled = self.dtype == torch.float16
        return torch.amp.GradScaler(self.device_type if enabled else 'cpu', enabled=enabled)


def use_deterministic_algorithms() -> None:
    """--deterministic: the algorithms PyTorch documents as giving the same result every time on the same GPU
    and software (cuDNN's and cuBLAS's included), where the fastest ones may add up in another order from one
    run to the next. An operation that has no such algorithm warns (PyTorch's warn_only) instead of stopping."""
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # cuBLAS's reproducible mode (read at its start)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True


def use_fast_paths(model, args, device: torch.device) -> None:
    """The device's fast paths, each switched by a flag; ``model`` keeps its own weights and keys."""
    if args.channels_last:  # NHWC: the layout fast convolution kernels want
        model.to(memory_format=torch.channels_last)
    if args.deterministic:
        use_deterministic_algorithms()
    if device.type == 'cuda':  # time the algorithms once, keep the fastest (which may differ from run to run)
        torch.backends.cudnn.benchmark = args.cudnn_benchmark and not args.deterministic
    if args.compile:
        problem = compile_problem(device.type)  # before training, not as a traceback at its first step
        if problem:
            raise UserError(f'--compile: {problem}; or train without --compile (the same results, slower steps)')
        model.compile()  # in place: the state_dict keeps MyModel's keys
