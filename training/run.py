"""The whole training run shared by the three scripts: epochs, TensorBoard, checkpoints, progress."""
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from .batches import make_batches
from .checkpoint import model_bundle, save_checkpoint
from .data import Data
from .device import autocast_dtype
from .engine import evaluate, train_one_epoch


def open_run_dir(log_dir: Path, run_name) -> Path:
    """logs/<run name>/: one folder per run, so TensorBoard shows runs side by side."""
    name = run_name or f'{datetime.now():%Y%m%d-%H%M%S}-{Path(sys.argv[0]).stem or "run"}'
    path, n = log_dir / name, 1
    while path.exists() and run_name is None:  # two runs started in the same second
        n += 1
        path = log_dir / f'{name}-{n}'
    return path


def config_of(args) -> dict:
    """The run's settings, as plain values that can go into a weights_only checkpoint."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) or v is None}


def speed_up(model, args, device: torch.device):
    """The device's fast paths, each switched by a flag. Returns (the module to call, autocast dtype)."""
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    amp_dtype = autocast_dtype(args.precision, device)
    return (torch.compile(model) if args.compile else model), amp_dtype


def fit(model, loss_fn, data: Data, args, device: torch.device, to_device=None) -> dict:
    """Train ``model`` for ``args.epochs`` epochs, testing, logging and saving after each one."""
    to_device = to_device or (lambda images, targets: (images, targets))
    say = (lambda *a, **k: None) if args.quiet else print
    with ExitStack() as stack:
        if args.dry_run:  # keep the real model/ and logs/ untouched unless asked otherwise
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix='dry-run-')))
            args.checkpoint_dir = args.checkpoint_dir or str(scratch / 'model')
            args.log_dir = args.log_dir or str(scratch / 'logs')
            args.epochs = min(args.epochs, 2)
        checkpoint_dir = Path(args.checkpoint_dir or 'model')
        run_dir = open_run_dir(Path(args.log_dir or 'logs'), args.run_name)

        net, amp_dtype = speed_up(model, args, device)
        train_batches, test_batches = make_batches(data, args, device, say)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
        say(f'data: {data.source}: {len(data.train)} training and {len(data.test)} test images, '
            f'{len(data.classes)} classes, {type(train_batches).__name__}')
        say(f'{args.epochs} epochs of {len(train_batches)} steps (batch {args.batch_size}, lr {args.lr}, '
            f'seed {args.seed}, {"bf16 autocast" if amp_dtype else "fp32"}'
            f'{", channels_last" if args.channels_last else ""}{", compiled" if args.compile else ""})')
        say(f'TensorBoard: {run_dir}/  checkpoints: {checkpoint_dir}/')

        writer = stack.enter_context(SummaryWriter(str(run_dir)))  # closed (and flushed) on exit
        best_accuracy, best_epoch, step, start = -1.0, -1, 0, time.perf_counter()
        for epoch in range(args.epochs):
            epoch_start = time.perf_counter()
            train_batches.set_epoch(epoch)
            bar = tqdm(train_batches, desc=f'epoch {epoch + 1}/{args.epochs}', leave=False, unit='step',
                       disable=args.quiet or not sys.stderr.isatty(), dynamic_ncols=True)

            def log_train_loss(at_step, loss):
                writer.add_scalar('train_loss', loss, at_step)
                bar.set_postfix(loss=f'{loss:.3f}', refresh=False)

            train, step = train_one_epoch(net, loss_fn, optimizer, bar, to_device, amp_dtype,
                                          args.log_interval, log_train_loss, step)
            bar.close()
            test = evaluate(net, loss_fn, test_batches, to_device, amp_dtype)
            writer.add_scalar('test_loss', test.loss, epoch)
            writer.add_scalar('test_accuracy', test.accuracy, epoch)
            writer.flush()  # so a TensorBoard that is watching sees each epoch as it ends

            save_checkpoint(model.state_dict(), checkpoint_dir / f'model_{epoch}.pth')
            bundle = model_bundle(model, data.classes, epoch=epoch, step=step, test_accuracy=test.accuracy,
                                  test_loss=test.loss, config=config_of(args))
            if test.accuracy > best_accuracy:
                best_accuracy, best_epoch = test.accuracy, epoch
                save_checkpoint(bundle, checkpoint_dir / 'best.pth')
            save_checkpoint(bundle, checkpoint_dir / 'last.pth')
            say(f'epoch {epoch + 1:>3}/{args.epochs}  train loss {train.loss:.4f}  acc {train.accuracy:6.2%}  '
                f'| test loss {test.loss:.4f}  acc {test.accuracy:6.2%}  '
                f'| {time.perf_counter() - epoch_start:5.1f}s  -> {checkpoint_dir / f"model_{epoch}.pth"}')

        total = time.perf_counter() - start
        print(f'done in {total:.1f}s: best test accuracy {best_accuracy:.2%} at epoch {best_epoch + 1} '
              f'({checkpoint_dir / "best.pth"}); TensorBoard: tensorboard --logdir {run_dir.parent}')
        if args.dry_run:
            print('dry run OK: data, model, training, evaluation, TensorBoard and checkpoints all work')
        return {'best_accuracy': best_accuracy, 'best_epoch': best_epoch, 'final_accuracy': test.accuracy,
                'seconds': total, 'run_dir': str(run_dir)}
