"""Batches for the training and test loops, made in one of two ways that yield the same tensors in
the same order:

- ``memory`` (whenever the data set fits): every image is decoded once into one uint8 tensor that
  lives on the training device (on a GPU, in GPU memory). A batch is a gather by index plus one
  ``.float().div_(255)`` -- exactly the arithmetic of ``ToTensor()`` -- with no per-image Python.
- ``stream``: the tutorial's DataLoader with ``ToTensor()`` and worker processes,
  for data sets too large to hold.

The training order is a fresh permutation every epoch, derived from (seed, epoch) alone, so a run
is reproducible and a resumed run sees exactly the order an uninterrupted one would. So is the data
augmentation (random crop and mirror, ``--crop-padding`` / ``--flip``): whole batches at a time, on the
device, in both paths, with the same result. With --normalize the
batches come normalised by the training set's per-channel mean and standard deviation.

In a run of several processes (train_ddp.py), ``--batch-size`` is the global batch: every process goes
through the same global batches and takes its own consecutive part of each, so that together they see
exactly the batches one process would.

    train_batches, test_batches = make_batches(data, args, device)
    for images, targets in train_batches.epoch(epoch):   # test_batches: just iterate
"""
import contextlib
import hashlib
import os
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate

from .data import IMAGE_SIZE, Data
from .distributed import ProcessGroup, share_bounds
from .errors import UnreadableImage, UserError
from .files import atomic_save, one_at_a_time
from .platforms import available_memory, ignore_interrupts, workers_start_deaf
from .recipe import Normalize, augment, augment_plan, channel_stats, stats_sample

BYTES_PER_IMAGE = 3 * IMAGE_SIZE * IMAGE_SIZE
CACHE_VERSION = 1


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of one epoch: a permutation of range(n) that depends on (seed, epoch) only."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator)


def as_model_input(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class Augmentation:
    """Random crop (``padding`` > 0) and mirror (``flip``; ``alternate``: each image in every other epoch) of
    every training image, new each epoch."""

    def __init__(self, padding: int, flip: bool, seed: int, alternate: bool = False):
        self.padding, self.flip, self.seed, self.alternate = padding, flip, seed, alternate

    @classmethod
    def from_args(cls, args):
        return cls(args.crop_padding, args.flip, args.seed, args.alternate_flip) \
            if args.crop_padding or args.flip else None

    def plan(self, n: int, epoch: int) -> torch.Tensor:
        order = epoch_order(n, self.seed, epoch) if self.alternate else None  # (the images, position by position)
        return augment_plan(n, self.seed, epoch, self.padding, self.flip, alternate_at=order)

    def __call__(self, images_nhwc: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
        return augment(images_nhwc, plan, self.padding)


class Batches:
    """What both ways of batching share: the length of an epoch, the finishing touches of a batch."""

    def __init__(self, n: int, batch_size: int, channels_last: bool):
        self.n, self.batch_size, self.channels_last = n, batch_size, channels_last
        self.normalize, self._normalize = None, None
        self.black = 0.0  # a black pixel as the model sees it: what --tta-shift fills uncovered columns with
        self.rank, self.world_size = 0, 1
        self.share_of_batch = 1.0  # this process's fraction of the global batch under way

    def share_with(self, group: ProcessGroup, training: bool = True) -> None:
        """Make this process take its part of every global batch (a run of ``group.world_size`` processes).
        A training step needs at least one image in every process (a test batch does not)."""
        if self.batch_size % group.world_size:
            raise UserError(f'--batch-size {self.batch_size} is the global batch and must be shared evenly by the '
                            f'{group.world_size} processes: give a multiple of {group.world_size}')
        last = self.n % self.batch_size
        if training and 0 < last < group.world_size:
            raise UserError(f'the last batch of an epoch would have {last} image(s), too few for '
                            f'{group.world_size} processes to share: choose another --batch-size')
        self.rank, self.world_size = group.rank, group.world_size

    def mine(self, start: int) -> tuple:
        """(start, end) of this process's part of the global batch that begins at image ``start``."""
        count = min(self.batch_size, self.n - start)
        first, end = share_bounds(count, self.rank, self.world_size)
        self.share_of_batch = (end - first) / count
        return start + first, start + end

    def set_normalization(self, stats: dict, device) -> None:
        """--normalize: batches come as (image - mean) / std per channel; ``stats`` go into the checkpoints."""
        self.normalize, self._normalize = stats, Normalize(**stats).to(device)
        self.black = self._normalize(torch.zeros(1, len(stats['mean']), 1, 1, device=device))  # -mean / std

    def __len__(self) -> int:
        """Batches in a whole epoch (the last one may be smaller)."""
        return -(-self.n // self.batch_size)

    def __iter__(self):
        return self.epoch(0)  # the test split: not shuffled, so the epoch does not matter

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        if self._normalize is not None:
            images = self._normalize(images)
        return as_model_input(images, self.channels_last)


class TensorBatches(Batches):
    """Batches gathered from a whole data set held as uint8 images (N x 32 x 32 x 3) on ``device``."""

    def __init__(self, images, labels, batch_size: int, device, shuffle_seed=None, channels_last=True,
                 augmentation: Augmentation = None):
        super().__init__(len(labels), batch_size, channels_last)
        self.images, self.labels = images.to(device), labels.to(device)
        self.seed, self.augmentation = shuffle_seed, augmentation

    def images_at(self, index: torch.Tensor) -> torch.Tensor:
        """Some of the images, as ToTensor() gives them (N x 3 x 32 x 32 in [0, 1]), on the CPU."""
        return self.images[index.to(self.images.device)].permute(0, 3, 1, 2).float().div_(255).cpu()

    def epoch(self, epoch: int, skip: int = 0):
        """Epoch ``epoch``'s batches in its order, after the first ``skip`` ones (a resumed epoch)."""
        n, device = self.n, self.images.device
        order = None if self.seed is None else epoch_order(n, self.seed, epoch).to(device)
        plan = self.augmentation.plan(n, epoch).to(device) if self.augmentation else None
        for start in range(skip * self.batch_size, n, self.batch_size):
            first, end = self.mine(start)  # the whole batch, or this process's part of it
            index = slice(first, end) if order is None else order[first:end]
            images = self.images[index]
            if plan is not None:  # on uint8, a quarter of the bytes float32 would move
                images = self.augmentation(images, plan[first:end])
            images = images.permute(0, 3, 1, 2).float().div_(255)  # == ToTensor(), bit for bit
            yield self.finish(images), self.labels[index]


class EpochSampler(Sampler):
    """The DataLoader path's batches of indices: the same per-epoch order (``seed`` None: not shuffled), each
    batch this process's part of the global one."""

    def __init__(self, batches: Batches, seed):
        # (a weak reference: with a cycle StreamBatches -> loader -> sampler -> StreamBatches, the garbage collector
        # would free the DataLoader in an order in which shutting down each worker process waits 5 s)
        self.batches, self.seed, self.epoch, self.skip = weakref.proxy(batches), seed, 0, 0

    def __iter__(self):
        b = self.batches
        order = torch.arange(b.n) if self.seed is None else epoch_order(b.n, self.seed, self.epoch)
        for start in range(self.skip * b.batch_size, b.n, b.batch_size):
            first, end = b.mine(start)
            yield order[first:end].tolist()

    def __len__(self) -> int:
        return max(len(self.batches) - self.skip, 0)


class Unreadable:
    """Stands in for an image that could not be read, carrying the one-line message. A DataLoader worker
    would turn a UserError into a traceback's text; this travels back to the main process as data."""

    def __init__(self, message: str):
        self.message = message


class ReportUnreadable(Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except UserError as e:
            return Unreadable(str(e))


def collate(samples):
    """DataLoader's default, unless the batch holds an unreadable image: then that image's marker."""
    return next((s for s in samples if isinstance(s, Unreadable)), None) or default_collate(samples)


class StreamBatches(Batches):
    """The tutorial's DataLoader (``ToTensor()`` per image), shuffled by ``EpochSampler`` when training. On a GPU
    its batches come in pinned memory and are copied with ``non_blocking=True`` (a copy from ordinary memory
    makes the CPU wait for the GPU, twice a step), then cropped, mirrored and normalised there, as the memory
    path does: the step finds its batch on the device already."""

    def __init__(self, dataset, batch_size: int, num_workers: int, shuffle_seed=None, channels_last=True,
                 augmentation: Augmentation = None, device=torch.device('cpu')):
        super().__init__(len(dataset), batch_size, channels_last)
        self.dataset, self.augmentation, self.device = dataset, augmentation, torch.device(device)
        self.sampler = EpochSampler(self, shuffle_seed)
        self.loader = DataLoader(ReportUnreadable(dataset), batch_sampler=self.sampler,
                                 num_workers=num_workers, persistent_workers=num_workers > 0, collate_fn=collate,
                                 generator=torch.Generator(),  # keeps DataLoader off the global RNG
                                 pin_memory=self.device.type == 'cuda',
                                 worker_init_fn=ignore_interrupts if num_workers else None)  # Ctrl+C: for us

    def images_at(self, index: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.dataset[i][0] for i in index.tolist()])

    def epoch(self, epoch: int, skip: int = 0):
        self.sampler.epoch, self.sampler.skip = epoch, skip
        plan = self.augmentation.plan(self.n, epoch).to(self.device) if self.augmentation else None
        with workers_start_deaf():  # (the workers start here, in the first epoch, and are kept for the next)
            loader = iter(self.loader)
        for number, batch in enumerate(loader, start=skip):
            if isinstance(batch, Unreadable):
                raise UnreadableImage(batch.message)
            images, labels = (t.to(self.device, non_blocking=True) for t in batch)  # (pinned: no wait)
            first, end = self.mine(number * self.batch_size)  # (the workers may run ahead of this batch)
            if plan is not None:  # the same crops and mirrors as the memory path
                images = self.augmentation(images.permute(0, 2, 3, 1), plan[first:end])
                images = images.permute(0, 3, 1, 2)
            yield self.finish(images), labels


def decode(dataset, threads: int) -> tuple:
    """All of ``dataset`` as (uint8 N x 32 x 32 x 3 images, int64 labels), exactly the values its
    ``ToTensor()`` transform gives (times 255)."""
    if isinstance(dataset, torchvision.datasets.CIFAR10):  # already decoded by torchvision: no copy
        return torch.from_numpy(dataset.data), torch.tensor(dataset.targets)
    images = torch.empty(len(dataset), IMAGE_SIZE, IMAGE_SIZE, 3, dtype=torch.uint8)
    labels = torch.empty(len(dataset), dtype=torch.long)

    def decode_one(i):
        image, labels[i] = dataset[i]
        images[i] = image.mul(255).round_().permute(1, 2, 0)  # float i/255 -> i, exactly

    if not hasattr(dataset, 'samples'):  # not files (FakeData seeds the global RNG per image): no threads
        threads = 1
    with ThreadPoolExecutor(threads) as pool:  # Pillow decodes with the GIL released
        for _ in pool.map(decode_one, range(len(dataset))):
            pass
    return images, labels


def cache_key(dataset) -> str:
    """Changes whenever a file is added, removed, renamed, relabelled or rewritten; not when the same folder
    is named another way (relative or absolute path)."""
    digest = hashlib.sha256(f'v{CACHE_VERSION} {IMAGE_SIZE}'.encode())
    for path, label in dataset.samples:
        stat = os.stat(path)
        name = os.path.relpath(path, dataset.root)
        digest.update(f'{name}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n'.encode())
    return digest.hexdigest()[:20]


def decode_cached(dataset, cache_dir, split: str, threads: int, say=print) -> tuple:
    """decode(), keeping the result in cache_dir so the next run starts fast (image folders only)."""
    if cache_dir is None or not hasattr(dataset, 'samples'):
        return decode(dataset, threads)
    path = Path(cache_dir) / f'{split}-{cache_key(dataset)}.pt'
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
    with one_at_a_time(Path(cache_dir) / f'.{split}.lock'):  # several processes: one decodes, the others load
        return _decode_cached(dataset, path, split, threads, say)


def _decode_cached(dataset, path: Path, split: str, threads: int, say) -> tuple:
    if path.is_file():
        try:
            cached = torch.load(path, map_location='cpu', weights_only=True)
            if cached['images'].shape == (len(dataset), IMAGE_SIZE, IMAGE_SIZE, 3):
                return cached['images'], cached['labels']
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
    start = time.perf_counter()
    images, labels = decode(dataset, threads)
    try:
        atomic_save({'images': images, 'labels': labels}, path)
        for stale in path.parent.glob(f'{split}-*.pt'):
            if stale != path:
                stale.unlink(missing_ok=True)
        where = f'cached in {path}'
    except OSError as e:
        where = f'not cached: {path.parent} is not writable ({e.strerror or e})'
    say(f'decoded {len(labels)} {split} images in {time.perf_counter() - start:.1f}s ({where})')
    return images, labels


def fits_in_memory(data: Data, device: torch.device) -> bool:
    """True when the decoded data set takes under a quarter of the device's free memory."""
    needed = (len(data.train) + len(data.test)) * BYTES_PER_IMAGE
    free = torch.cuda.mem_get_info(device)[0] if device.type == 'cuda' else available_memory()
    return needed < free // 4


def make_batches(data: Data, args, device: torch.device, resumed: dict = None, group: ProcessGroup = None) -> tuple:
    """(train batches, test batches) in the way ``args.loader`` asks: auto, memory or stream. With
    ``args.normalize`` both are normalised by statistics of the training images (a resumed run keeps the
    statistics its weights learned with). With a process ``group``, this process's part of every batch."""
    mode, augmentation = args.loader, Augmentation.from_args(args)
    say = (lambda *a: None) if getattr(args, 'quiet', False) else print
    if mode == 'auto':
        mode = 'memory' if fits_in_memory(data, device) else 'stream'
    if mode == 'memory':
        threads = max(1, min(8, os.cpu_count() or 1))
        decoded = {}  # --val-size: both splits are parts of the training set, which is decoded once

        def tensors(dataset, split):
            whole = dataset.dataset if isinstance(dataset, Subset) else dataset
            if id(whole) not in decoded:
                decoded[id(whole)] = decode_cached(whole, data.cache_dir, split, threads, say)
            images, labels = decoded[id(whole)]
            return (images, labels) if whole is dataset else (images[dataset.indices], labels[dataset.indices])

        train, test = tensors(data.train, 'train'), tensors(data.test, 'test')
        batches = (TensorBatches(*train, args.batch_size, device, args.seed, args.channels_last, augmentation),
                   TensorBatches(*test, args.batch_size, device, None, args.channels_last))
    else:
        batches = (StreamBatches(data.train, args.batch_size, args.num_workers, args.seed, args.channels_last,
                                 augmentation, device),
                   StreamBatches(data.test, args.batch_size, args.num_workers, None, args.channels_last, None, device))
    if getattr(args, 'normalize', False):
        stats = (resumed or {}).get('normalize') or \
            channel_stats(batches[0].images_at(stats_sample(len(data.train))))
        for b in batches:
            b.set_normalization(stats, device)
    if group is not None:
        batches[0].share_with(group)
        batches[1].share_with(group, training=False)
    return batches
