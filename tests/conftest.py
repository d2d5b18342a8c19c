"""Shared helpers: small generated data sets in the real on-disk formats, and running the real scripts.

Nothing here touches the network: every script runs with a proxy that points at a closed local port.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datagen import CLASSES, write_cifar10, write_image_folders  # noqa: F401  (used by the test modules)

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = {'http_proxy': 'http://127.0.0.1:9', 'https_proxy': 'http://127.0.0.1:9',
           'HTTP_PROXY': 'http://127.0.0.1:9', 'HTTPS_PROXY': 'http://127.0.0.1:9', 'no_proxy': ''}


def run_script(script: str, *args, cwd: Path, check: bool = True, timeout: float = 300, env=None):
    """Run one of the project's scripts as a user would, from ``cwd``; returns the CompletedProcess."""
    full_env = {**os.environ, **OFFLINE, 'PYTHONUNBUFFERED': '1', **(env or {})}
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=full_env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f'{script} {" ".join(map(str, args))} exited {result.returncode}\n'
                             f'--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}')
    return result


def assert_clean_error(result, *fragments):
    """A user error: exit code 2, one line on stderr that names the problem, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert 'Traceback' not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), (fragment, lines[0])
    return lines[0]


def load_weights(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.fixture(scope='session')
def cifar_dir(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp('cifar'))


TRAIN_FLAGS = ('--epochs', 2, '--batch-size', 16, '--lr', 0.02, '--log-interval', 5,  # 63 steps an epoch
               '--precision', 'fp32')  # bit-for-bit comparisons are made in fp32
SCRIPTS = ['train.py', 'train_gpu_1.py', 'train_gpu_2.py']


@pytest.fixture(scope='session')
def runs(cifar_dir, tmp_path_factory) -> dict:
    """One real 2-epoch run of each training script on the same generated CIFAR-10 batches, same seed,
    in a folder of its own: {script: (folder, CompletedProcess)}. Shared by the tests that only read."""
    done = {}
    for script in SCRIPTS:
        work = tmp_path_factory.mktemp(script.replace('.py', ''))
        device = ('--device', 'cpu') if script == 'train_gpu_2.py' and not torch.cuda.is_available() else ()
        done[script] = work, run_script(script, *TRAIN_FLAGS, '--data-dir', cifar_dir, *device,
                                        '--run-name', 'run', cwd=work)
    return done


@pytest.fixture(scope='session')
def trained(runs):
    """The train.py run: (folder, CompletedProcess)."""
    return runs['train.py']
