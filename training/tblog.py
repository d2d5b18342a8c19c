"""A training run's TensorBoard log: the tutorial's ``SummaryWriter``, and what a run shows beyond the
tutorial's three scalars.

    with RunLog(args, progress, classes) as writer:
        writer.add_scalar('test_accuracy', accuracy, epoch)   # SummaryWriter's own methods
        writer.log_epoch(epoch, model, train, test, best)      # the extras

Step units, one per tag: ``train_loss`` and ``learning_rate`` use the training step (batches since the
start, as the tutorial's ``total_train_step``); every other scalar, image and histogram uses the epoch
(from 0). The extras run once per epoch or once per run, never per step, and need no extra device sync.
"""
import math
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.tensorboard import SummaryWriter

from .distributed import is_main_process, unwrap, world_size
from .errors import UserError
from .folders import config_of, new_run_dir
from .fonts import class_label, font

CELL = 30  # pixels per confusion-matrix cell


LABEL_SIZE = 12  # pixels: the labels of the sample grid and the confusion matrix


def _text_width(draw, text, typeface) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=typeface)
    return right - left


def confusion_image(confusion: torch.Tensor, classes) -> np.ndarray:
    """A confusion matrix as an RGB picture (rows: true class, columns: predicted; darker = more of the row)."""
    n, typeface = len(classes), font(LABEL_SIZE)
    names = [class_label(name, i)[:10] for i, name in enumerate(classes)]
    probe = ImageDraw.Draw(Image.new('RGB', (1, 1)))
    margin = max(_text_width(probe, name, typeface) for name in names) + 8
    image = Image.new('RGB', (margin + n * CELL + 4, margin + n * CELL + 4), 'white')
    draw = ImageDraw.Draw(image)
    share = confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)
    for i in range(n):
        draw.text((4, margin + i * CELL + CELL // 3), names[i], fill='black', font=typeface)
        column_label = Image.new('RGB', (margin, CELL), 'white')  # written sideways above its column
        ImageDraw.Draw(column_label).text((4, CELL // 3), names[i], fill='black', font=typeface)
        image.paste(column_label.rotate(90, expand=True), (margin + i * CELL, 0))
        for j in range(n):
            shade = int(255 * (1 - share[i, j].item()))
            colour = (shade, shade, 255) if i == j else (255, shade, shade)
            box = (margin + j * CELL, margin + i * CELL, margin + (j + 1) * CELL - 1, margin + (i + 1) * CELL - 1)
            draw.rectangle(box, fill=colour, outline=(220, 220, 220))
            count = str(int(confusion[i, j]))
            draw.text((box[0] + (CELL - _text_width(draw, count, typeface)) // 2, box[1] + CELL // 3), count,
                      fill='white' if shade < 110 else 'black', font=typeface)
    return np.asarray(image)


def labelled_grid(dataset, classes, count: int = 32, per_row: int = 8, scale: int = 2) -> np.ndarray:
    """``count`` training images spread over the data set, enlarged, each with its class name below."""
    indices = torch.linspace(0, len(dataset) - 1, min(count, len(dataset))).long().tolist()
    side, label_height, typeface = 32 * scale, 16, font(LABEL_SIZE)
    rows = math.ceil(len(indices) / per_row)
    grid = Image.new('RGB', (per_row * (side + 4), rows * (side + label_height + 4)), 'white')
    draw = ImageDraw.Draw(grid)
    for k, index in enumerate(indices):
        image, label = dataset[index]
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        x, y = (k % per_row) * (side + 4), (k // per_row) * (side + label_height + 4)
        grid.paste(Image.fromarray(pixels).resize((side, side), Image.NEAREST), (x, y))
        draw.text((x, y + side + 1), class_label(classes[label], label)[:10], fill='black', font=typeface)
    return np.asarray(grid)


class NoWriter:
    """What the processes other than rank 0 of a run of several write to: nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class RunLog:
    """The run's SummaryWriter, in a run folder of its own (a resumed run's own folder, without the steps
    logged after its checkpoint). A write that fails (a full disk, a folder that went away) becomes one
    UserError, whichever call meets it; every call is timed, so that the logging's cost is known. In a run
    of several processes, rank 0 alone writes: one run folder, whatever the number of processes."""

    def __init__(self, args, progress, classes):
        self.args, self.classes, self.seconds, self.started = args, list(classes), 0.0, time.perf_counter()
        resumed = progress.run_dir is not None
        self.writes = is_main_process()
        if not self.writes:
            self.run_dir, self.writer = Path(progress.run_dir or args.log_dir), NoWriter()
            return
        with self.guard(Path(progress.run_dir or args.log_dir)):
            self.run_dir = Path(progress.run_dir) if resumed else new_run_dir(args.log_dir, args.run_name,
                                                                              args.script)
            # purge_step: a resumed run drops what the interrupted one logged after its checkpoint
            self.writer = SummaryWriter(str(self.run_dir), purge_step=progress.step + 1 if resumed else None)
        progress.run_dir = str(self.run_dir)

    @contextmanager
    def guard(self, folder=None):
        start = time.perf_counter()
        try:
            yield
        except OSError as e:
            raise self.write_error(folder, e) from None
        finally:
            self.seconds += time.perf_counter() - start

    def write_error(self, folder, e: OSError) -> UserError:
        return UserError(f'cannot write TensorBoard logs to {folder or self.run_dir}/ ({e.strerror or e}); free '
                         f'some space or choose another --log-dir (the checkpoints are intact)')

    def __getattr__(self, name):  # add_scalar, add_image, flush, ...: SummaryWriter's own methods, guarded
        if name == 'writer':  # not made (yet)
            raise AttributeError(name)
        method = getattr(self.writer, name)

        def guarded(*args, **kwargs):
            with self.guard():
                return method(*args, **kwargs)
        return guarded

    def elapsed(self) -> float:
        """Seconds since the run's log was opened."""
        return time.perf_counter() - self.started

    def __enter__(self):
        # the writer's thread prints a traceback when a write fails; the main thread reports it in one line
        self.previous_hook = threading.excepthook
        threading.excepthook = lambda hook_args: None if issubclass(hook_args.exc_type, OSError) \
            else self.previous_hook(hook_args)
        return self

    def __exit__(self, *exc):
        threading.excepthook = self.previous_hook
        try:
            self.writer.close()
        except OSError as e:
            if exc[0] is None:  # a failed write not reported yet
                raise self.write_error(None, e) from None

    def log_run_start(self, model, dataset) -> None:
        """Once per run: sample training images with their labels, and the model's graph."""
        if not self.writes:
            return
        model = unwrap(model)
        example = torch.zeros(1, 3, 32, 32, device=next(model.parameters()).device)
        if self.args.channels_last:
            example = example.contiguous(memory_format=torch.channels_last)
        with self.guard():
            self.writer.add_image('train_samples', labelled_grid(dataset, self.classes), 0, dataformats='HWC')
            try:
                with warnings.catch_warnings():  # add_graph traces with torch.jit, which warns it is deprecated
                    warnings.simplefilter('ignore', FutureWarning)
                    self.writer.add_graph(model, example)
            except OSError:
                raise
            except Exception as e:  # tracing is a nicety; never let it stop training
                print(f'note: the model graph was not logged ({type(e).__name__}: {e})')

    def log_epoch(self, epoch: int, model, train, test, best: dict) -> None:
        """Per epoch: time, speed, train accuracy, per-class accuracy, confusion matrix, histograms of the
        weights and of the last step's gradients, and the buffered events on disk, so that a TensorBoard
        that is watching sees each epoch as it ends. After the last epoch (``test`` kept its outputs):
        a precision-recall curve per class, and the settings with the final and best metrics (HPARAMS)."""
        if not self.writes:
            return
        w, model = self.writer, unwrap(model)
        with self.guard():
            w.add_scalar('epoch_seconds', train.seconds, epoch)
            w.add_scalar('images_per_second', train.images / max(train.seconds, 1e-9), epoch)
            w.add_scalar('train_accuracy', train.accuracy, epoch)
            w.add_scalar('train_loss_epoch', train.loss, epoch)
            confusion = test.confusion
            per_class = confusion.diag().double() / confusion.sum(1).clamp(min=1)
            for name, accuracy in zip(self.classes, per_class.tolist()):
                w.add_scalar(f'test_accuracy_per_class/{name}', accuracy, epoch)
            w.add_image('confusion_matrix', confusion_image(confusion, self.classes), epoch, dataformats='HWC')
            for name, parameter in model.named_parameters():
                w.add_histogram(f'weights/{name}', parameter.detach().float().cpu(), epoch)
                gradient = None if parameter.grad is None else parameter.grad.detach().float().cpu()
                if gradient is not None and torch.isfinite(gradient).all():  # fp16: an overflowed step is skipped
                    w.add_histogram(f'gradients/{name}', gradient, epoch)
            if test.probabilities is not None:
                for c, name in enumerate(self.classes):
                    w.add_pr_curve(f'pr_curve/{name}', test.targets == c, test.probabilities[:, c], epoch)
                hparams = {k: v for k, v in config_of(self.args).items() if isinstance(v, (int, float, str, bool))}
                hparams['world_size'] = world_size()  # processes that trained together
                w.add_hparams(hparams, {'hparam/best_test_accuracy': best['accuracy'],
                                        'hparam/best_epoch': best['epoch'],
                                        'hparam/final_test_accuracy': test.accuracy,
                                        'hparam/final_test_loss': test.loss}, run_name='.')
            w.flush()
