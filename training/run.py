"""The whole training run shared by the three scripts: epochs, TensorBoard, checkpoints, progress."""
import math
import signal
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from . import tblog
from .batches import make_batches
from .checkpoint import (load_training_state, model_bundle, prepare_checkpoint_dir, restore, save_checkpoint,
                         training_state)
from .cli import UserError
from .data import Data, hold_out
from .device import autocast_dtype
from .engine import Diverged, Meter, evaluate, keep_device, train_one_epoch
from .recipe import FlipAverage, channel_stats, inference_net, lr_schedule, make_optimizer, stats_sample


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


def speed_up(net, args, device: torch.device):
    """The device's fast paths, each switched by a flag. Returns (the module to call, autocast dtype)."""
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    amp_dtype = autocast_dtype(args.precision, device)
    return (torch.compile(net) if args.compile else net), amp_dtype


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


class TrainingRun:
    """One training run: the state that lives across epochs, and one method per phase of an epoch."""

    def __init__(self, model, loss_fn, data: Data, args, device, to_device, stack: ExitStack):
        self.model, self.loss_fn, self.data, self.args, self.device = model, loss_fn, data, args, device
        self.to_device = to_device or keep_device
        self.say = (lambda *a, **k: None) if args.quiet else print
        if args.dry_run:  # keep the real model/ and logs/ untouched unless asked otherwise
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix='dry-run-')))
            args.checkpoint_dir = args.checkpoint_dir or str(scratch / 'model')
            args.log_dir = args.log_dir or str(scratch / 'logs')
            args.epochs = min(args.epochs, 2)
        self.checkpoint_dir = Path(args.checkpoint_dir or 'model')
        resumed = None
        if args.resume:
            # the flags already hold its settings (restored when they were parsed)
            resume_path, resumed = load_training_state(args.resume, self.checkpoint_dir, device)
        if args.val_size:
            data = self.data = hold_out(data, args.val_size)
        prepare_checkpoint_dir(self.checkpoint_dir)
        self.run_dir = Path(resumed['run_dir']) if resumed else open_run_dir(Path(args.log_dir or 'logs'),
                                                                             args.run_name)
        self.optimizer = make_optimizer(model, args)
        self.step, self.start_epoch, self.meter_state = 0, 0, None
        self.best = {'accuracy': -1.0, 'epoch': -1}
        self.last_test = {'epoch': -1, 'test_accuracy': None, 'test_loss': None}
        if resumed:
            restore(resumed, model, self.optimizer, data.classes, resume_path)
            self.step, self.best = resumed['step'], resumed['best']
            self.start_epoch, self.meter_state = resumed['resume']['epoch'], resumed['resume']['meter']
            self.last_test = {k: resumed[k] for k in self.last_test}
        self.train_batches, self.test_batches = make_batches(data, args, device, self.say)
        self.lr_at = lr_schedule(args, args.epochs * len(self.train_batches))
        self.normalize = None
        if args.normalize:  # computed once; a resumed run keeps the statistics its weights learned with
            self.normalize = (resumed or {}).get('normalize') or \
                channel_stats(self.train_batches.images_at(stats_sample(len(data.train))))
        # what the engine calls: normalisation (if any) + MyModel, then the device's fast paths; the
        # checkpoints hold MyModel's own weights, so they load into the tutorial's MyModel
        self.net, self.amp_dtype = speed_up(inference_net(model, self.normalize).to(device), args, device)
        self.eval_net = FlipAverage(self.net) if args.tta else self.net
        self.eval_loss = nn.CrossEntropyLoss()  # the test loss is plain cross-entropy, with any recipe
        self.say(f'data: {data.source}: {len(data.train)} training and {len(data.test)} test images, '
                 f'{len(data.classes)} classes, {type(self.train_batches).__name__}')
        self.say(f'{args.epochs} epochs of {len(self.train_batches)} steps (batch {args.batch_size}, lr {args.lr}, '
                 f'seed {args.seed}, {"bf16 autocast" if self.amp_dtype else "fp32"}'
                 f'{", channels_last" if args.channels_last else ""}{", compiled" if args.compile else ""})'
                 + (f'; resuming {resume_path} at epoch {self.start_epoch + 1}, step {self.step}' if resumed else ''))
        self.say(f'recipe {args.recipe}: {describe_recipe(args)}')
        self.say(f'TensorBoard: {self.run_dir}/  checkpoints: {self.checkpoint_dir}/')
        # purge_step: a resumed run drops what the interrupted one logged after its checkpoint
        self.writer = SummaryWriter(str(self.run_dir), purge_step=self.step + 1 if resumed else None)
        stack.callback(close_quietly, self.writer)
        quiet_writer_thread(stack)
        self.stop = stack.enter_context(GracefulStop())
        self.logging_seconds = 0.0  # TensorBoard extras, timed so that their cost is known
        if not resumed:
            with self.timed_logging():
                example = torch.zeros(1, 3, 32, 32, device=device)
                tblog.log_run_start(self.writer, model, data.train, data.classes,
                                    example.contiguous(memory_format=torch.channels_last) if args.channels_last
                                    else example)

    @contextmanager
    def timed_logging(self):
        start = time.perf_counter()
        yield
        self.logging_seconds += time.perf_counter() - start

    def train(self, epoch: int):
        """Train one epoch (the rest of it, when resuming); returns its EpochResult."""
        meter = Meter(self.device, self.meter_state if epoch == self.start_epoch else None)
        self.train_batches.set_epoch(epoch, skip=meter.batches)
        bar = tqdm(self.train_batches, desc=f'epoch {epoch + 1}/{self.args.epochs}', leave=False, unit='img',
                   unit_scale=self.args.batch_size, initial=meter.batches, dynamic_ncols=True,
                   disable=self.args.quiet or not sys.stderr.isatty())  # no bar in CI logs or files

        def log_train_loss(step, loss):
            self.writer.add_scalar('train_loss', loss, step)
            self.writer.add_scalar('learning_rate', self.optimizer.param_groups[0]['lr'], step)
            bar.set_postfix(loss=f'{loss:.3f}', refresh=False)

        try:
            meter, self.step = train_one_epoch(self.net, self.loss_fn, self.optimizer, bar, self.to_device,
                                               self.amp_dtype, self.args.log_interval, log_train_loss, self.step,
                                               meter, self.stop, self.lr_at, self.args.clip_grad)
            result = meter.result()  # the epoch's one sync
            if not math.isfinite(result.loss):
                raise Diverged(self.step, result.loss)
        except Diverged as e:
            raise UserError(f'training diverged: the {e} (is the learning rate {self.args.lr} too high? try a '
                            f'smaller --lr); the checkpoints of earlier epochs are kept') from None
        finally:
            bar.close()
        if meter.batches < len(self.train_batches):  # stopped by a signal in the middle of the epoch
            self.save_state(epoch, meter)
            self.exit_interrupted()
        return result

    def test_and_save(self, epoch: int, train, train_seconds: float):
        """Evaluate, log the epoch, and write model_{epoch}.pth, best.pth when it is the best, and last.pth."""
        last = epoch == self.args.epochs - 1
        test = evaluate(self.eval_net, self.eval_loss, self.test_batches, self.to_device, self.amp_dtype,
                        keep_outputs=last)
        self.writer.add_scalar('test_loss', test.loss, epoch)
        self.writer.add_scalar('test_accuracy', test.accuracy, epoch)
        with self.timed_logging():
            tblog.log_epoch(self.writer, epoch, self.model, train, test, self.data.classes,
                            train_seconds)
        self.writer.flush()  # so a TensorBoard that is watching sees each epoch as it ends
        self.last_test = {'epoch': epoch, 'test_accuracy': test.accuracy, 'test_loss': test.loss}
        bundle = model_bundle(self.model, self.data.classes, **self.last_test, step=self.step,
                              config=config_of(self.args), normalize=self.normalize)
        # model_{i}.pth is the tutorial's plain state_dict, unless the images must be normalised to use it
        save_checkpoint(bundle if self.normalize else self.model.state_dict(),
                        self.checkpoint_dir / f'model_{epoch}.pth')
        if test.accuracy > self.best['accuracy']:
            self.best = {'accuracy': test.accuracy, 'epoch': epoch}
            save_checkpoint(bundle, self.checkpoint_dir / 'best.pth')
        self.save_state(epoch + 1)
        if last:
            with self.timed_logging():
                tblog.log_run_end(self.writer, epoch, test, self.data.classes, config_of(self.args), self.best)
        return test

    def save_state(self, next_epoch: int, meter: Meter = None) -> None:
        save_checkpoint(training_state(self.model, self.data.classes, self.optimizer, config_of(self.args),
                                       self.run_dir, self.step, next_epoch, self.best, self.last_test,
                                       meter and meter.state_dict(), self.normalize),
                        self.checkpoint_dir / 'last.pth')

    def exit_interrupted(self):
        script = Path(sys.argv[0]).name or 'train.py'
        where = '' if self.checkpoint_dir == Path('model') else f' --checkpoint-dir {self.checkpoint_dir}'
        print(f'interrupted: training state saved in {self.checkpoint_dir / "last.pth"} (step {self.step}); '
              f'continue with: python {script} --resume{where}', file=sys.stderr)
        sys.exit(128 + self.stop.signum)


def describe_recipe(args) -> str:
    sgd = f'SGD momentum {args.momentum}{" (Nesterov)" if args.nesterov else ""}' if args.momentum else 'plain SGD'
    parts = [sgd,
             f'weight decay {args.weight_decay}' if args.weight_decay else None,
             f'{args.schedule} schedule' + (f' ({args.warmup:.0%} warm-up)' if args.warmup else ''),
             f'label smoothing {args.label_smoothing}' if args.label_smoothing else None,
             f'gradients clipped to norm {args.clip_grad}' if args.clip_grad else None,
             'normalised inputs' if args.normalize else None,
             f'random crops (padding {args.crop_padding})' if args.crop_padding else None,
             'random mirroring' if args.flip else None, 'mirror TTA' if args.tta else None]
    return ', '.join(p for p in parts if p)


def quiet_writer_thread(stack: ExitStack) -> None:
    """TensorBoard writes from a thread; when a write fails (disk full) the thread prints a traceback, then
    the main thread gets the same error at its next log call and reports it in one line. Silence the first."""
    previous = threading.excepthook

    def hook(hook_args):
        if not issubclass(hook_args.exc_type, OSError):
            previous(hook_args)

    threading.excepthook = hook
    stack.callback(setattr, threading, 'excepthook', previous)


def close_quietly(writer) -> None:
    """Flush and close; a log write that already failed has been reported, so do not raise it twice."""
    try:
        writer.close()
    except OSError:
        pass


def fit(model, loss_fn, data: Data, args, device: torch.device, to_device=None) -> dict:
    """Train ``model`` for ``args.epochs`` epochs, testing, logging and saving after each one."""
    with ExitStack() as stack:  # closes the TensorBoard writer and restores signal handlers, however we leave
        run = TrainingRun(model, loss_fn, data, args, device, to_device, stack)
        try:
            return run_epochs(run, args)
        except OSError as e:  # checkpoint writes report their own errors: this is the TensorBoard writer
            raise UserError(f'cannot write TensorBoard logs to {run.run_dir}/ ({e.strerror or e}); free some '
                            f'space or choose another --log-dir (the checkpoints are intact)') from None


def run_epochs(run: TrainingRun, args) -> dict:
    """The epoch loop, then the final summary."""
    start = time.perf_counter()
    for epoch in range(run.start_epoch, args.epochs):
        epoch_start = time.perf_counter()
        train = run.train(epoch)
        test = run.test_and_save(epoch, train, time.perf_counter() - epoch_start)
        run.say(f'epoch {epoch + 1:>3}/{args.epochs}  train loss {train.loss:.4f}  acc {train.accuracy:6.2%}  '
                f'| test loss {test.loss:.4f}  acc {test.accuracy:6.2%}  '
                f'| {time.perf_counter() - epoch_start:5.1f}s  -> {run.checkpoint_dir / f"model_{epoch}.pth"}')
        if run.stop():
            run.exit_interrupted()
    total = time.perf_counter() - start
    print(f'done in {total:.1f}s: best test accuracy {run.best["accuracy"]:.2%} at epoch '
          f'{run.best["epoch"] + 1} ({run.checkpoint_dir / "best.pth"}); '
          f'TensorBoard: tensorboard --logdir {run.run_dir.parent} (this run: {run.run_dir.name}; '
          f'its extra logging took {run.logging_seconds:.1f}s, {run.logging_seconds / total:.1%} of the run)')
    if args.dry_run:
        print('dry run OK: data, model, training, evaluation, TensorBoard and checkpoints all work')
    return {'best_accuracy': run.best['accuracy'], 'best_epoch': run.best['epoch'],
            'final_accuracy': run.last_test['test_accuracy'], 'seconds': total, 'run_dir': str(run.run_dir)}
