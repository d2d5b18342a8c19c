"""The whole training run shared by the three scripts: epochs, TensorBoard, checkpoints, progress."""
import math
import signal
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from .batches import make_batches
from .checkpoint import (load_training_state, model_bundle, prepare_checkpoint_dir, restore, save_checkpoint,
                         training_state)
from .cli import UserError
from .data import Data
from .device import autocast_dtype
from .engine import Diverged, Meter, evaluate, train_one_epoch


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


class GracefulStop:
    """Ctrl+C or SIGTERM: finish the current step, save, then exit 130 / 143. A second Ctrl+C stops at once."""

    def __enter__(self):
        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        self.__exit__()  # the next signal gets the default behaviour

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def __call__(self) -> bool:
        return self.signum is not None


RESUMED_SETTINGS = ('batch_size', 'lr', 'seed', 'precision', 'channels_last', 'log_interval')


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
        resumed = None
        if args.resume:
            resume_path, resumed = load_training_state(args.resume, checkpoint_dir, device)
            for key in RESUMED_SETTINGS:  # the settings the weights were trained with
                setattr(args, key, resumed['config'][key])
        prepare_checkpoint_dir(checkpoint_dir)
        run_dir = Path(resumed['run_dir']) if resumed else open_run_dir(Path(args.log_dir or 'logs'), args.run_name)

        net, amp_dtype = speed_up(model, args, device)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
        step, start_epoch, meter_state = 0, 0, None
        best = {'accuracy': -1.0, 'epoch': -1}
        last_test = {'epoch': -1, 'test_accuracy': None, 'test_loss': None}
        if resumed:
            restore(resumed, model, optimizer, data.classes, resume_path)
            step, best = resumed['step'], resumed['best']
            start_epoch, meter_state = resumed['resume']['epoch'], resumed['resume']['meter']
            last_test = {k: resumed[k] for k in last_test}
        train_batches, test_batches = make_batches(data, args, device, say)
        say(f'data: {data.source}: {len(data.train)} training and {len(data.test)} test images, '
            f'{len(data.classes)} classes, {type(train_batches).__name__}')
        say(f'{args.epochs} epochs of {len(train_batches)} steps (batch {args.batch_size}, lr {args.lr}, '
            f'seed {args.seed}, {"bf16 autocast" if amp_dtype else "fp32"}'
            f'{", channels_last" if args.channels_last else ""}{", compiled" if args.compile else ""})'
            + (f'; resuming {resume_path} at epoch {start_epoch + 1}, step {step}' if resumed else ''))
        say(f'TensorBoard: {run_dir}/  checkpoints: {checkpoint_dir}/')

        # purge_step: a resumed run drops what the interrupted one logged after its checkpoint
        writer = stack.enter_context(SummaryWriter(str(run_dir), purge_step=step + 1 if resumed else None))
        stop = stack.enter_context(GracefulStop())
        start = time.perf_counter()

        def save_state(next_epoch, meter=None):
            save_checkpoint(training_state(model, data.classes, optimizer, config_of(args), run_dir, step,
                                           next_epoch, best, last_test, meter and meter.state_dict()),
                            checkpoint_dir / 'last.pth')

        def stop_now():
            script = Path(sys.argv[0]).name or 'train.py'
            where = '' if checkpoint_dir == Path('model') else f' --checkpoint-dir {checkpoint_dir}'
            print(f'interrupted: training state saved in {checkpoint_dir / "last.pth"} (step {step}); '
                  f'continue with: python {script} --resume{where}', file=sys.stderr)
            sys.exit(128 + stop.signum)

        for epoch in range(start_epoch, args.epochs):
            epoch_start = time.perf_counter()
            meter = Meter(device, meter_state if epoch == start_epoch else None)
            train_batches.set_epoch(epoch, skip=meter.batches)
            bar = tqdm(train_batches, desc=f'epoch {epoch + 1}/{args.epochs}', leave=False, unit='step',
                       initial=meter.batches, disable=args.quiet or not sys.stderr.isatty(), dynamic_ncols=True)

            def log_train_loss(at_step, loss):
                writer.add_scalar('train_loss', loss, at_step)
                bar.set_postfix(loss=f'{loss:.3f}', refresh=False)

            try:
                meter, step = train_one_epoch(net, loss_fn, optimizer, bar, to_device, amp_dtype,
                                              args.log_interval, log_train_loss, step, meter, stop)
                train = meter.result()
                if not math.isfinite(train.loss):
                    raise Diverged(step, train.loss)
            except Diverged as e:
                raise UserError(f'training diverged: the {e} (is the learning rate {args.lr} too high? try a '
                                f'smaller --lr); the checkpoints of earlier epochs are kept') from None
            finally:
                bar.close()
            if meter.batches < len(train_batches):  # stopped by a signal in the middle of the epoch
                save_state(epoch, meter)
                stop_now()
            test = evaluate(net, loss_fn, test_batches, to_device, amp_dtype)
            writer.add_scalar('test_loss', test.loss, epoch)
            writer.add_scalar('test_accuracy', test.accuracy, epoch)
            writer.flush()  # so a TensorBoard that is watching sees each epoch as it ends

            last_test = {'epoch': epoch, 'test_accuracy': test.accuracy, 'test_loss': test.loss}
            save_checkpoint(model.state_dict(), checkpoint_dir / f'model_{epoch}.pth')
            if test.accuracy > best['accuracy']:
                best = {'accuracy': test.accuracy, 'epoch': epoch}
                save_checkpoint(model_bundle(model, data.classes, **last_test, step=step, config=config_of(args)),
                                checkpoint_dir / 'best.pth')
            save_state(epoch + 1)
            say(f'epoch {epoch + 1:>3}/{args.epochs}  train loss {train.loss:.4f}  acc {train.accuracy:6.2%}  '
                f'| test loss {test.loss:.4f}  acc {test.accuracy:6.2%}  '
                f'| {time.perf_counter() - epoch_start:5.1f}s  -> {checkpoint_dir / f"model_{epoch}.pth"}')
            if stop():
                stop_now()

        total = time.perf_counter() - start
        print(f'done in {total:.1f}s: best test accuracy {best["accuracy"]:.2%} at epoch {best["epoch"] + 1} '
              f'({checkpoint_dir / "best.pth"}); TensorBoard: tensorboard --logdir {run_dir.parent}')
        if args.dry_run:
            print('dry run OK: data, model, training, evaluation, TensorBoard and checkpoints all work')
        return {'best_accuracy': best['accuracy'], 'best_epoch': best['epoch'],
                'final_accuracy': last_test['test_accuracy'], 'seconds': total, 'run_dir': str(run_dir)}
