"""Data: CIFAR-10 (torchvision's own loader), an image folder of your own, or FakeData for --dry-run.

Every image reaches the model as the tutorial's ``ToTensor()`` makes it: float32 3x32x32 in [0, 1].
How the images are batched (decoded once into memory, or streamed) is ``batches.py``'s concern.
"""
import contextlib
import hashlib
import http.client
import os
import socket
import tarfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import transforms
from torchvision.datasets.utils import extract_archive

from .errors import UserError
from .files import one_at_a_time
from .paths import is_project_path, project_path
from .platforms import progress_bar_class, progress_stream, replace_file, shows_progress

CIFAR10_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer',
                   'dog', 'frog', 'horse', 'ship', 'truck']
CHINESE_NAMES = {'airplane': '飞机', 'automobile': '汽车', 'bird': '鸟', 'cat': '猫', 'deer': '鹿',
                 'dog': '狗', 'frog': '青蛙', 'horse': '马', 'ship': '船', 'truck': '卡车'}
CIFAR10_MB = 163  # the archive's size (170,498,071 bytes)
STALL_SECONDS = 30.0  # a download that gets no data for this long is given up (then: the offline message)
IMAGE_SIZE = 32  # MyModel's first Linear layer expects 64 x 4 x 4 features, i.e. 32x32 inputs
# the picture formats people have, and every file suffix Pillow reads each by: '.jfif' is how a browser on
# Windows saves a JPEG, '.jpe' an older one; '.mpo' a camera's; '.apng' a PNG
IMAGE_FORMATS = {'JPEG', 'MPO', 'PNG', 'GIF', 'BMP', 'DIB', 'WEBP', 'TIFF', 'PPM'}


def image_suffixes() -> frozenset:
    """The file suffixes read as images, for training and for test.py (lower case, with the dot)."""
    return frozenset(suffix for suffix, kind in Image.registered_extensions().items() if kind in IMAGE_FORMATS)


def hidden(name: str) -> bool:
    """A file or folder nobody means as data: hidden (.DS_Store, .ipynb_checkpoints/, and the ._cat.jpg
    AppleDouble files that macOS leaves beside every file it copies to a USB stick or a zip), or a zip's
    __MACOSX/ folder of them."""
    return name.startswith('.') or name == '__MACOSX'


class CIFAR10(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR10, accepting any extracted ``cifar-10-batches-py/`` in the official format.

    torchvision checks each extracted file against the MD5 of the official release; here only the
    downloaded archive is checked (by ``download()``), so a copy re-packed in the same format loads too.
    A damaged file still fails, when it is unpickled.
    """
    train_list = [[name, None] for name, _ in torchvision.datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in torchvision.datasets.CIFAR10.test_list]
    meta = {**torchvision.datasets.CIFAR10.meta, 'md5': None}


@dataclass
class Data:
    train: Dataset
    test: Dataset
    classes: list
    source: str  # a human-readable description, printed at start-up
    cache_dir: Path = None  # where decoded images may be cached (image folders only)


def load_data(data_dir=None, dry_run: bool = False, batch_size: int = 64, seed: int = 0, say=print) -> Data:
    """CIFAR-10 in data_dir (downloaded when missing), or data_dir/train + data_dir/test image folders.
    None: the project's own dataset/. ``say`` prints the line that a download starts with."""
    if dry_run:
        return fake_data(batch_size, seed)
    root = Path(data_dir) if data_dir is not None else project_path('dataset')
    if (root / 'train').is_dir() or (root / 'test').is_dir():
        return load_image_folders(root)
    if not root.is_dir() and not is_project_path(root, 'dataset'):  # (the project's own is made when missing)
        raise UserError(f'--data-dir {data_dir}: no such folder')
    return load_cifar10(root, say)


def load_training_data(args) -> Data:
    """What a training run trains and evaluates on: ``load_data``, with --val-size images held out."""
    data = load_data(args.data_dir, args.dry_run, args.batch_size, args.seed)  # (a download says so, even --quiet)
    return hold_out(data, args.val_size) if args.val_size else data


def hold_out(data: Data, size: int) -> Data:
    """--val-size: ``size`` training images become the evaluation set in place of the test split. They
    are the same images whatever --seed is, so runs with different seeds or settings compare fairly."""
    n = len(data.train)
    if size >= n:
        raise UserError(f'--val-size {size}: the training set has only {n} images; hold out fewer')
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    return Data(Subset(data.train, sorted(order[size:])), Subset(data.train, sorted(order[:size])), data.classes,
                f'{data.source} (evaluating on {size} held-out training images, not on test/)', data.cache_dir)


def cifar10_offline_help(root: Path) -> str:
    return (f'put {CIFAR10.filename} (from {CIFAR10.url}) or its extracted {CIFAR10.base_folder}/ '
            f'folder into {root}/ by hand, or use --data-dir DIR with DIR/train/<class>/ and '
            f'DIR/test/<class>/ image folders')


def load_cifar10(root: Path, say=print) -> Data:
    folder = root / CIFAR10.base_folder
    files = [name for name, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta['filename']]
    if not all((folder / name).is_file() for name in files):
        with contextlib.suppress(OSError):  # (a folder that cannot be made fails in the download, in one line)
            root.mkdir(parents=True, exist_ok=True)
        with one_at_a_time(root / '.download.lock'):  # several processes: one downloads, the others wait
            if not all((folder / name).is_file() for name in files):
                fetch_cifar10(root, say)
    try:
        train = CIFAR10(str(root), train=True, transform=transforms.ToTensor())
        test = CIFAR10(str(root), train=False, transform=transforms.ToTensor())
    except Exception as e:  # unpickling a damaged file can raise almost anything
        raise UserError(f'{folder}/ is damaged or incomplete ({type(e).__name__}: {e}); delete it and '
                        f'{cifar10_offline_help(root)}') from None
    return Data(train, test, list(train.classes), f'CIFAR-10 in {folder}/')


def fetch_cifar10(root: Path, say=print) -> None:
    """CIFAR-10's archive into ``root`` -- the one already there when its checksum is right (put there by hand),
    else downloaded -- then unpacked. A damaged archive of the learner's is replaced only by a verified one."""
    archive = root / CIFAR10.filename
    had_archive = archive.is_file()
    if not (had_archive and md5_of(archive) == CIFAR10.tgz_md5):
        try:
            download(CIFAR10.url, archive, CIFAR10.tgz_md5, say)
        except DownloadFailed as e:
            why = f'{archive} is incomplete or damaged and downloading it again failed' if had_archive \
                else 'downloading it failed'
            raise UserError(f'CIFAR-10 is not in {root}/ and {why} ({e}). Offline? {cifar10_offline_help(root)}') \
                from None
    try:
        extract_archive(str(archive), str(root))
    except (OSError, EOFError, tarfile.TarError, zlib.error) as e:
        raise UserError(f'{archive} cannot be unpacked ({type(e).__name__}: {e}); delete it and '
                        f'{cifar10_offline_help(root)}') from None


class DownloadFailed(Exception):
    """Why a download did not give a verified file (offline, blocked, stalled, damaged)."""


def md5():
    return hashlib.md5(usedforsecurity=False)  # a checksum, not security (FIPS machines refuse md5 else)


def md5_of(path: Path) -> str:
    digest = md5()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, target: Path, expected_md5: str, say=print) -> None:
    """``url`` into ``target``: one line before it starts, a progress bar in a terminal, given up when no byte
    arrives for STALL_SECONDS, and the MD5 checksum checked before the file takes ``target``'s name (until
    then it is a hidden .part file, removed on any failure)."""
    partial = target.with_name(f'.{target.name}.part')
    say(f'downloading CIFAR-10: {target.name} ({CIFAR10_MB} MB) from {url} into {target.parent}/ '
        f'(given up after {STALL_SECONDS:g}s without data)')
    digest = md5()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={'User-Agent': 'cifar10-tutorial'}),
                                    timeout=STALL_SECONDS) as response, open(partial, 'wb') as out:
            size = int(response.headers.get('Content-Length') or 0) or None
            with progress_bar_class()(total=size, unit='B', unit_scale=True, unit_divisor=1024, leave=False,
                                      desc=target.name, file=progress_stream(),
                                      disable=not shows_progress()) as bar:
                for chunk in iter(lambda: response.read(1 << 16), b''):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != expected_md5:
            raise DownloadFailed(f'the file that arrived is not CIFAR-10 (its MD5 checksum is {digest.hexdigest()}, '
                                 f'not {expected_md5}): a proxy or captive portal page, or a damaged transfer')
        replace_file(partial, target)
    except (socket.timeout, TimeoutError):
        raise DownloadFailed(f'no data arrived for {STALL_SECONDS:g}s') from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise DownloadFailed(f'{type(e).__name__}: {getattr(e, "reason", None) or e}') from None
    finally:
        partial.unlink(missing_ok=True)


def load_image_folders(root: Path) -> Data:
    """ROOT/train/<class>/* and ROOT/test/<class>/*: any number of classes, any image size."""
    for split in ('train', 'test'):
        if not (root / split).is_dir():
            raise UserError(f'{root}/ has no {split}/ folder: an image-folder dataset needs '
                            f'{root}/train/<class>/ and {root}/test/<class>/')
    transform = transforms.Compose([transforms.Resize((IMAGE_SIZE, IMAGE_SIZE)), transforms.ToTensor()])
    splits = {}
    for split in ('train', 'test'):
        try:
            splits[split] = ImageFolder(str(root / split), transform=transform, loader=read_rgb)
        except (FileNotFoundError, OSError) as e:
            raise UserError(f'{root / split}/: {e}') from None
    train, test = splits['train'], splits['test']
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise UserError(f'{root}/train/ and {root}/test/ must hold the same class folders '
                        f'(only in train: {only_train or "-"}; only in test: {only_test or "-"})')
    if len(train.classes) < 2:
        raise UserError(f'{root}/train/ holds one class folder ({train.classes[0]}/): a classifier needs at least '
                        f'two classes to tell apart; add a folder per class')
    return Data(train, test, list(train.classes), f'image folders in {root}/', cache_dir=root / '.cache')


class ImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder, reading every suffix Pillow reads the formats above by (torchvision's own
    list lacks .jfif), and skipping hidden files and folders (see ``hidden``) as class folders and as images."""

    def __init__(self, root: str, **kwargs):
        suffixes = image_suffixes()

        def is_image(path: str) -> bool:
            parts = Path(path).relative_to(root).parts
            return Path(path).suffix.lower() in suffixes and not any(hidden(part) for part in parts)
        super().__init__(root, is_valid_file=is_image, **kwargs)

    def find_classes(self, directory: str) -> tuple:
        classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not hidden(entry.name))
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: index for index, name in enumerate(classes)}


def read_rgb(path) -> Image.Image:
    """ImageFolder's loader, but a file Pillow cannot read is named in a one-line error."""
    try:
        with Image.open(path) as image:
            return image.convert('RGB')
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f'{path}: unreadable image in the data set ({type(e).__name__}: {e}); '
                        f'fix or remove the file') from None


def fake_data(batch_size: int, seed: int) -> Data:
    """Random images, four training steps and two test steps: enough to exercise everything."""
    def make(size, offset):
        return torchvision.datasets.FakeData(size=size, image_size=(3, IMAGE_SIZE, IMAGE_SIZE),
                                             num_classes=10, transform=transforms.ToTensor(),
                                             random_offset=seed * 1_000_003 + offset)
    return Data(make(4 * batch_size, 0), make(2 * batch_size, 1), list(CIFAR10_CLASSES),
                'FakeData (random images, --dry-run)')
