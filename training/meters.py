"""Running sums of the training and test loops, kept on the device.

``.item()`` makes the CPU wait until the GPU has caught up, so the tutorial's ``loss.item()`` at every
step costs speed; here the sums stay tensors on the device and are read only when something is logged
(every --log-interval steps) and once at the end of each loop. In a run of several processes
(train_ddp.py) each process keeps the sums of its own images, and they are added up over the processes when
they are read, so every process reads the same figures, those of the whole global batches.
"""
import math
import time
from dataclasses import dataclass

import torch

from .distributed import gather_from_processes, is_main_process, sum_over_processes, world_size
from .errors import Diverged


@dataclass
class EpochResult:
    loss: float       # mean loss per image
    accuracy: float   # fraction of images classified correctly
    images: int
    seconds: float    # from the meter's creation to its result (the device included)
    confusion: torch.Tensor = None      # test: counts, rows = true class, columns = predicted, on the CPU
    probabilities: torch.Tensor = None  # test with keep_outputs: N x classes, on the CPU
    targets: torch.Tensor = None        # test with keep_outputs: N true classes, on the CPU


def totals(*values) -> list:
    """Numbers (tensors on one device, or ints) as Python numbers, summed over the processes of the run."""
    if world_size() == 1:
        return [v.item() if isinstance(v, torch.Tensor) else v for v in values]
    device = next((v.device for v in values if isinstance(v, torch.Tensor)), 'cpu')
    summed = sum_over_processes(torch.stack([torch.as_tensor(v, device=device).double() for v in values]))
    return [int(x) if isinstance(v, int) or not v.is_floating_point() else x
            for v, x in zip(values, summed.tolist())]


class TrainMeter:
    """One training epoch's sums: loss per image, correct answers, and the loss since the last log.
    Its state goes into a mid-epoch last.pth, so that a resumed epoch reports (and logs) exactly what an
    uninterrupted one would."""

    def __init__(self, device, state: dict = None):
        state = dict(state or {})
        if 'window_steps' in state:  # saved by an earlier version: a sum of per-step means
            per_step = state['seen'] / max(state['batches'], 1)
            state['window_sum'], state['window_images'] = state['window_sum'] * per_step, \
                round(state.pop('window_steps') * per_step)
        if not is_main_process():  # the saved sums are the whole run's: rank 0 carries them on
            state = {'batches': state.get('batches', 0)}
        self.loss_sum = torch.tensor(state.get('loss_sum', 0.0), dtype=torch.float32, device=device)
        self.window_sum = torch.tensor(state.get('window_sum', 0.0), dtype=torch.float32, device=device)
        self.correct = torch.tensor(state.get('correct', 0), dtype=torch.long, device=device)
        self.seen, self.batches = state.get('seen', 0), state.get('batches', 0)
        self.window_images = state.get('window_images', 0)
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """After each step: its mean loss and its outputs. No sync."""
        loss_sum = loss.detach().float() * targets.shape[0]
        self.batches += 1
        self.seen += targets.shape[0]
        self.window_images += targets.shape[0]
        self.loss_sum += loss_sum
        self.window_sum += loss_sum
        self.correct += (outputs.detach().argmax(1) == targets).sum()

    def window_loss(self, step: int) -> float:
        """The mean loss per image since the last call (the one sync); Diverged if it is NaN or infinite."""
        window_sum, images = totals(self.window_sum, self.window_images)
        loss = window_sum / max(images, 1)
        if not math.isfinite(loss):
            raise Diverged(step, loss)
        self.window_sum.zero_()
        self.window_images = 0
        return loss

    def result(self, step: int) -> EpochResult:
        """The epoch's mean loss and accuracy (its one other sync); Diverged if the loss is not finite."""
        loss_sum, correct, seen = totals(self.loss_sum, self.correct, self.seen)
        loss = loss_sum / max(seen, 1)
        if not math.isfinite(loss):
            raise Diverged(step, loss)
        return EpochResult(loss, correct / max(seen, 1), seen, time.perf_counter() - self.start)

    def state_dict(self) -> dict:
        """The sums so far (of all processes: every process must call it at the same step)."""
        loss_sum, window_sum, correct, seen, window_images = totals(
            self.loss_sum, self.window_sum, self.correct, self.seen, self.window_images)
        return {'loss_sum': loss_sum, 'window_sum': window_sum, 'correct': correct, 'seen': seen,
                'batches': self.batches, 'window_images': window_images}


class TestMeter:
    """The test loop's sums: summed loss, correct answers, the confusion matrix, and with ``keep_outputs``
    every image's class probabilities (for the PR curves)."""
    __test__ = False  # for pytest: a meter, not a group of tests

    def __init__(self, device, keep_outputs: bool = False):
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.confusion, self.seen, self.keep_outputs = None, 0, keep_outputs
        self.probabilities, self.targets = [], []
        self.start = time.perf_counter()

    def add(self, loss_sum: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """After each batch: its summed loss and its outputs. No sync."""
        classes = outputs.shape[1]
        predictions = outputs.argmax(1)
        if self.confusion is None:  # int32: Apple GPUs (mps) cannot index_add_ int64 in PyTorch 2.6 - 2.8
            self.confusion = torch.zeros(classes * classes, dtype=torch.int32, device=targets.device)
        # index_add_, unlike bincount, does not ask the GPU how long its result must be: no sync
        self.confusion.index_add_(0, targets * classes + predictions, torch.ones_like(targets, dtype=torch.int32))
        self.seen += targets.shape[0]
        self.loss_sum += loss_sum.float()
        self.correct += (predictions == targets).sum()
        if self.keep_outputs:
            self.probabilities.append(outputs.float().softmax(1))
            self.targets.append(targets)

    def result(self) -> EpochResult:
        loss_sum, correct, seen = totals(self.loss_sum, self.correct, self.seen)
        result = EpochResult(loss_sum / max(seen, 1), correct / max(seen, 1), seen, 0.0)
        if self.confusion is not None:
            classes = math.isqrt(self.confusion.numel())
            result.confusion = sum_over_processes(self.confusion).view(classes, classes).cpu().long()
        if self.keep_outputs:
            result.probabilities = gather_from_processes(torch.cat(self.probabilities))
            result.targets = gather_from_processes(torch.cat(self.targets))
        result.seconds = time.perf_counter() - self.start
        return result
