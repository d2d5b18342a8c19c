"""Small generated data sets in the real on-disk formats: CIFAR-10's pickled batches and image folders.

Used by the tests and by benchmark.py (which runs on this data unless given --data-dir); nothing in
training depends on it.
"""
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


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
