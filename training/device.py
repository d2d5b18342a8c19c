"""Choosing the device, and the fast paths it offers (bf16, channels_last, cuDNN autotuning)."""
from pathlib import Path

import torch

from .cli import UserError


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


def autocast_dtype(precision: str, device: torch.device):
    """torch.bfloat16 when autocast should run, None for plain fp32."""
    if precision == 'fp32' or (precision == 'auto' and not has_native_bf16(device)):
        return None
    if device.type not in ('cuda', 'cpu'):
        raise UserError(f'--precision bf16 is not supported on {device.type}; use --precision fp32')
    return torch.bfloat16
