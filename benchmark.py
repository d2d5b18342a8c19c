"""Times the tutorial's training loop against this project's, in one process, on the same data and device.

    python benchmark.py                              # generated CIFAR-10-format data, best device
    python benchmark.py --data-dir DIR --device cpu  # your data: CIFAR-10 or DIR/train + DIR/test folders

(a) "tutorial": the loop as the tutorial writes it -- DataLoader + ToTensor(), batch 64, NCHW fp32,
    .to(device) on every batch and .item() after every step;
(b) "project": this project's loop with its defaults -- data decoded once into a tensor on the device,
    channels_last, bf16 where native, loss and accuracy summed on the device.
Both train for --steps steps after --warmup steps, then run the whole test set, alternating for --rounds
rounds. Prints median images/s, the ratios, the peak memory each phase added, and one JSON line. Timing is a measurement, never a test.
"""
import gc
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from itertools import islice
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from model import MyModel
from tests.datagen import write_cifar10
from training.batches import make_batches
from training.cli import ArgumentParser, non_negative_int, positive_int, run, training_parser
from training.data import load_data
from training.device import select_device
from training.engine import evaluate, train_one_epoch
from training.run import speed_up

FORWARD_FLOPS = 2 * (32 * 32 * 32 * 3 * 25 + 16 * 16 * 32 * 32 * 25 + 8 * 8 * 64 * 32 * 25 + 1024 * 64 + 64 * 10)
TRAIN_FLOPS = 3 * FORWARD_FLOPS  # forward + backward, per image


class PeakMemory:
    """Peak memory a phase adds: CUDA's allocator peak, or resident memory sampled every 2 ms on the CPU."""

    def __init__(self, device):
        self.device = device

    def _rss(self):
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')

    def _sample(self):
        while not self.done.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        gc.collect()
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        elif Path('/proc/self/statm').exists():
            self.start = self.peak = self._rss()
            self.done = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == 'cuda':
            self.added = torch.cuda.max_memory_allocated() - self.start
        elif hasattr(self, 'thread'):
            self.done.set()
            self.thread.join()
            self.added = max(self.peak, self._rss()) - self.start
        else:
            self.added = float('nan')


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def tutorial(data, device, steps, warmup, batch_size):
    """The tutorial's P26-30 loop, as written there (minus its print on every step)."""
    torch.manual_seed(0)
    model = MyModel(len(data.classes)).to(device)
    loss_fn = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for i, (images, targets) in enumerate(islice(DataLoader(data.train, batch_size=batch_size), warmup + steps)):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        images, targets = images.to(device), targets.to(device)
        loss = loss_fn(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()  # the tutorial prints it: a CPU-GPU sync every step
    train_seconds = time.perf_counter() - start
    model.eval()
    total_loss, correct, start = 0.0, 0, time.perf_counter()
    with torch.no_grad():
        for images, targets in DataLoader(data.test, batch_size=batch_size):
            images, targets = images.to(device), targets.to(device)
            outputs = model(images)
            total_loss += loss_fn(outputs, targets).item()
            correct += (outputs.argmax(1) == targets).sum().item()
    return train_seconds, time.perf_counter() - start


def project(data, device, steps, warmup, batch_size):
    """This project's loop, with the defaults every training script uses."""
    args = training_parser('', epochs=1).parse_args(['--batch-size', str(batch_size)])
    torch.manual_seed(0)
    model = MyModel(len(data.classes)).to(device)
    loss_fn = nn.CrossEntropyLoss().to(device)
    net, amp_dtype = speed_up(model, args, device)
    train_batches, test_batches = make_batches(data, args, device, say=lambda *a: None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = iter(train_batches)
    train_one_epoch(net, loss_fn, optimizer, islice(batches, warmup), amp_dtype=amp_dtype)  # ends in a sync
    start = time.perf_counter()
    train_one_epoch(net, loss_fn, optimizer, islice(batches, steps), amp_dtype=amp_dtype)
    train_seconds = time.perf_counter() - start
    evaluate(net, loss_fn, islice(iter(test_batches), 2), amp_dtype=amp_dtype)  # warm up the eval kernels
    start = time.perf_counter()
    evaluate(net, loss_fn, test_batches, amp_dtype=amp_dtype)
    return train_seconds, time.perf_counter() - start, amp_dtype


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument('--data-dir', help='CIFAR-10 or image folders (default: 20,000 generated CIFAR-10 images)')
    p.add_argument('--device', choices=['auto', 'cpu', 'cuda', 'mps'], default='auto')
    p.add_argument('--batch-size', type=positive_int, default=64)
    p.add_argument('--steps', type=positive_int, default=150, help='timed training steps (default: 150)')
    p.add_argument('--warmup', type=non_negative_int, default=10, help='untimed steps first (default: 10)')
    p.add_argument('--rounds', type=positive_int, default=3, help='alternating runs of both loops; medians are '
                   'reported (default: 3)')
    args = p.parse_args(argv)
    device = select_device(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        if args.data_dir is None:
            args.data_dir = str(write_cifar10(Path(scratch), per_batch=4000, test=2560))
        needed = (args.steps + args.warmup) * args.batch_size
        samples = {'tutorial': [], 'project': []}
        for _ in range(args.rounds):  # interleaved, so both loops see the same machine conditions
            for name, loop in (('tutorial', tutorial), ('project', project)):
                with PeakMemory(device) as memory:
                    data = load_data(args.data_dir)
                    if len(data.train) < needed:
                        raise SystemExit(f'error: {len(data.train)} training images, {needed} needed: lower --steps')
                    train_s, test_s, *rest = loop(data, device, args.steps, args.warmup, args.batch_size)
                    test_images = len(data.test)
                    del data
                samples[name].append((args.steps * args.batch_size / train_s, test_images / test_s, memory.added))
                precision = 'bf16' if rest and rest[0] else 'fp32'
    results = {name: {'train_img_s': statistics.median(s[0] for s in runs),
                      'test_img_s': statistics.median(s[1] for s in runs),
                      'peak_mem_added_mb': max(s[2] for s in runs) / 2**20} for name, runs in samples.items()}
    t, f = results['tutorial'], results['project']
    print(f'device: {device} ({torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()}, '
          f'{torch.get_num_threads()} threads), torch {torch.__version__}, batch {args.batch_size}, '
          f'project precision {precision}')
    print(f'{"":10} {"train img/s":>12} {"test img/s":>12} {"peak MB added":>14} {"train TFLOP/s":>14}')
    for name, r in results.items():
        print(f'{name:10} {r["train_img_s"]:12.0f} {r["test_img_s"]:12.0f} {r["peak_mem_added_mb"]:14.0f} '
              f'{r["train_img_s"] * TRAIN_FLOPS / 1e12:14.3f}')
    ratios = {'train_ratio': f['train_img_s'] / t['train_img_s'], 'test_ratio': f['test_img_s'] / t['test_img_s']}
    print(f'{"ratio":10} {ratios["train_ratio"]:11.2f}x {ratios["test_ratio"]:11.2f}x')
    print(json.dumps({'device': str(device), 'torch': torch.__version__, 'batch_size': args.batch_size,
                      'steps': args.steps, 'rounds': args.rounds, 'precision': precision, **results, **ratios}))


if __name__ == '__main__':
    run(main)
