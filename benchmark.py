"""Times the tutorial's training loop against this project's, in one process, on the same data and device.

    python benchmark.py                              # generated CIFAR-10-format data, best device
    python benchmark.py --data-dir DIR --device cpu  # your data: CIFAR-10 or DIR/train + DIR/test folders
    python benchmark.py --device cuda --batch-size 128 --compile

(a) "tutorial": the loop as the tutorial writes it -- DataLoader + ToTensor(), NCHW fp32, .to(device) on
    every batch and .item() after every step -- for one epoch (after --warmup untimed steps) and a test pass;
(b) "project": train_gpu_2.py itself (its main(), in this process) for two epochs with its defaults --
    data decoded once into a tensor on the device, channels_last, bf16 where native, sums on the device --
    timed by the script's own meters over its second epoch (the first one warms up).
The two alternate for --rounds rounds. Prints median images/s, the ratios, the peak memory each added,
and one JSON line. Timing is a measurement, never a test.
"""
import argparse
import contextlib
import gc
import io
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import train_gpu_2
from model import MyModel
from training.cli import ArgumentParser, non_negative_int, positive_int, run
from training.data import load_data
from training.datagen import write_cifar10
from training.device import Autocast, has_native_bf16, select_device
from training.recipe import RECIPES

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
    """Wait for the device: a timer read before that would measure how fast work is queued, not done."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def tutorial(data_dir, device, warmup, batch_size):
    """The tutorial's P26-30 loop, as written there (minus its print on every step), for one epoch:
    (training images/s after ``warmup`` steps, test images/s)."""
    data = load_data(data_dir)
    torch.backends.cudnn.benchmark = False  # the tutorial's setting, whatever the project's run left
    torch.manual_seed(0)
    model = MyModel(len(data.classes)).to(device)
    loss_fn = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    timed = 0
    for i, (images, targets) in enumerate(DataLoader(data.train, batch_size=batch_size)):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        images, targets = images.to(device), targets.to(device)
        loss = loss_fn(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()  # the tutorial prints it: a CPU-GPU sync every step
        timed += len(targets) if i >= warmup else 0
    sync(device)
    train_speed = timed / (time.perf_counter() - start)
    model.eval()
    total_loss, correct, start = 0.0, 0, time.perf_counter()
    with torch.no_grad():
        for images, targets in DataLoader(data.test, batch_size=batch_size):
            images, targets = images.to(device), targets.to(device)
            outputs = model(images)
            total_loss += loss_fn(outputs, targets).item()
            correct += (outputs.argmax(1) == targets).sum().item()
    sync(device)
    return train_speed, len(data.test) / (time.perf_counter() - start)


def project(data_dir, device, batch_size, flags, scratch):
    """train_gpu_2.py's main() for two epochs: the speeds its own meters measured in the second one."""
    with contextlib.redirect_stdout(io.StringIO()):  # its own lines would break up the table
        progress = train_gpu_2.main(['--data-dir', str(data_dir), '--device', device.type, '--epochs', '2',
                                     '--batch-size', str(batch_size), '--quiet', '--checkpoint-dir',
                                     f'{scratch}/model', '--log-dir', f'{scratch}/logs', *flags])
    shutil.rmtree(scratch)
    epoch = progress.history[-1]
    return epoch['train_images'] / epoch['train_seconds'], epoch['test_images'] / epoch['test_seconds']


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', help='CIFAR-10 or image folders (default: generated CIFAR-10-format images)')
    p.add_argument('--images', type=positive_int, default=20_000,
                   help='training images to generate when there is no --data-dir (default: 20,000)')
    p.add_argument('--device', choices=['auto', 'cpu', 'cuda', 'mps'], default='auto')
    p.add_argument('--batch-size', type=positive_int, default=64, help='for both loops (default: 64)')
    p.add_argument('--precision', choices=['auto', 'fp32', 'bf16', 'fp16'], default='auto', help="the project's")
    p.add_argument('--compile', action='store_true', help='torch.compile the project\'s model')
    p.add_argument('--recipe', choices=list(RECIPES), default='tutorial', help="the project's recipe")
    p.add_argument('--warmup', type=non_negative_int, default=10,
                   help="the tutorial loop's untimed first steps (default: 10)")
    p.add_argument('--rounds', type=positive_int, default=3, help='alternating runs of both loops; medians are '
                   'reported (default: 3)')
    args = p.parse_args(argv)
    device = select_device(args.device)
    flags = ['--precision', args.precision, '--recipe', args.recipe, *(['--compile'] if args.compile else [])]
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data_dir or write_cifar10(Path(scratch) / 'data', per_batch=-(-args.images // 5), test=2560)
        samples = {'tutorial': [], 'project': []}
        for _ in range(args.rounds):  # interleaved, so both loops see the same machine conditions
            for name in samples:
                with PeakMemory(device) as memory:
                    speeds = tutorial(data_dir, device, args.warmup, args.batch_size) if name == 'tutorial' else \
                        project(data_dir, device, args.batch_size, flags, f'{scratch}/run')
                samples[name].append((*speeds, memory.added))
    results = {name: {'train_img_s': statistics.median(s[0] for s in runs),
                      'test_img_s': statistics.median(s[1] for s in runs),
                      'peak_mem_added_mb': max(s[2] for s in runs) / 2**20} for name, runs in samples.items()}
    t, f = results['tutorial'], results['project']
    precision = {torch.bfloat16: 'bf16', torch.float16: 'fp16'}.get(Autocast(args.precision, device).dtype, 'fp32')
    print(f'device: {device} ({torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()}, '
          f'{torch.get_num_threads()} threads), torch {torch.__version__}, batch {args.batch_size}, project: '
          f'{precision}, recipe {args.recipe}{", compiled" if args.compile else ""}')
    print(f'{"":10} {"train img/s":>12} {"test img/s":>12} {"peak MB added":>14} {"train TFLOP/s":>14}')
    for name, r in results.items():
        print(f'{name:10} {r["train_img_s"]:12.0f} {r["test_img_s"]:12.0f} {r["peak_mem_added_mb"]:14.0f} '
              f'{r["train_img_s"] * TRAIN_FLOPS / 1e12:14.3f}')
    ratios = {'train_ratio': f['train_img_s'] / t['train_img_s'], 'test_ratio': f['test_img_s'] / t['test_img_s']}
    print(f'{"ratio":10} {ratios["train_ratio"]:11.2f}x {ratios["test_ratio"]:11.2f}x')
    print(json.dumps({'device': str(device), 'torch': torch.__version__, 'batch_size': args.batch_size,
                      'rounds': args.rounds, 'precision': precision, 'recipe': args.recipe, 'compile': args.compile,
                      **results, **ratios}))


def cpu_name() -> str:
    """The CPU's model name and whether it computes bf16 natively (that decides --precision auto)."""
    try:
        model = next(line.split(':', 1)[1].strip() for line in Path('/proc/cpuinfo').read_text().splitlines()
                     if line.startswith('model name'))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f'{model}, {"native bf16" if has_native_bf16(torch.device("cpu")) else "no native bf16"}'


if __name__ == '__main__':
    run(main)
