"""Choosing the device, and the fast paths it offers (bf16, channels_last, cuDNN autotuning, compiling)."""
import contextlib
from pathlib import Path

import torch

from .errors import UserError


def select_device(name: str = 'auto') -> torch.device:
    """'auto' -> cuda if there is an NVIDIA GPU, else mps (Apple GPU), else cpu."""
    cuda_ok = torch.cuda.is_available()
    mps_ok = torch.backends.mps.is_available()
    if name == 'auto':
        name = 'cuda' if cuda_ok else 'mps' if mps_ok else 'cpu'
    elif name == 'cuda' and not cuda_ok:
        raise UserError('--device cuda: CUDA is not available here (no NVIDIA GPU or driver, or a '
                        'CPU-only PyTorch build); use --device auto or --device cpu')
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
        try:
            flags = Path('/proc/cpuinfo').read_text().split()
        except OSError:  # not Linux: no cheap way to know, so stay with fp32
            return False
        return 'avx512_bf16' in flags or 'amx_bf16' in flags
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


def use_fast_paths(model, args, device: torch.device) -> None:
    """The device's fast paths, each switched by a flag; ``model`` keeps its own weights and keys."""
    if args.channels_last:  # NHWC: the layout fast convolution kernels want
        model.to(memory_format=torch.channels_last)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = args.cudnn_benchmark  # time the algorithms once, keep the fastest
    if args.compile:
        model.compile()  # in place: the state_dict keeps MyModel's keys
