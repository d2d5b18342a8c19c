"""Shared helpers: small generated data sets in the real on-disk formats, and running the real scripts.

Nothing here touches the network: every script runs with a proxy that points at a closed local port.
"""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
OFFLINE = {'http_proxy': 'http://127.0.0.1:9', 'https_proxy': 'http://127.0.0.1:9',
           'HTTP_PROXY': 'http://127.0.0.1:9', 'HTTPS_PROXY': 'http://127.0.0.1:9', 'no_proxy': ''}


def learnable_images(n: int, num_classes: int, seed: int, size: int = 32):
    """uint8 NxHxWx3 images whose class is their colour, under noise: learnable in a few dozen SGD steps."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    colours = np.random.default_rng(1234).integers(0, 256, size=(num_classes, 3))
    images = rng.normal(0, 20, size=(n, size, size, 3)) + colours[labels][:, None, None, :]
    return images.clip(0, 255).astype(np.uint8), labels.tolist()


def write_cifar10(root: Path, per_batch: int = 200, test: int = 200, seed: int = 0) -> Path:
    """root/cifar-10-batches-py/ in CIFAR-10's own format: pickled dicts of uint8 rows (R, G, B planes)."""
    folder = root / 'cifar-10-batches-py'
    folder.mkdir(parents=True)
    names = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
    for k, name in enumerate(names):
        images, labels = learnable_images(test if name == 'test_batch' else per_batch, 10, seed + k)
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # HWC -> CHW planes, flattened
        with open(folder / name, 'wb') as f:
            pickle.dump({'batch_label': name, 'labels': labels, 'data': rows,
                         'filenames': [f'{i}.png' for i in range(len(labels))]}, f)
    with open(folder / 'batches.meta', 'wb') as f:
        pickle.dump({'label_names': CLASSES, 'num_cases_per_batch': per_batch, 'num_vis': 3072}, f)
    return root


def write_image_folders(root: Path, classes=('cat', 'dog', 'horse'), train: int = 40, test: int = 12,
                        seed: int = 0) -> Path:
    """root/train/<class>/*.png|jpg and root/test/<class>/*: mixed sizes and formats, as users have."""
    for split, n in (('train', train), ('test', test)):
        images, labels = learnable_images(n * len(classes), len(classes), seed + (split == 'test'), size=48)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            picture = Image.fromarray(image)
            if i % 3 == 0:
                picture.resize((32, 32)).save(folder / f'{i:04d}.png')
            elif i % 3 == 1:
                picture.save(folder / f'{i:04d}.jpg', quality=95)
            else:
                picture.resize((64, 40)).convert('RGBA').save(folder / f'{i:04d}.png')
    return root


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
