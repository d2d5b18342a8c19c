"""Running sums of the training and test loops, kept on the device.

``.item()`` makes the CPU wait until the GPU has caught up, so the tutorial's ``loss.item()`` at every
step costs speed; here the sums stay tensors on the device and are read only when something is logged
(every --log-interval steps) and once at the end of each loop.
"""
import math
import time
from dataclasses import dataclass

import torch

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


class TrainMeter:
    """One training epoch's sums: loss per image, correct answers, and the loss since the last log.
    Its state goes into a mid-epoch last.pth, so that a resumed epoch reports (and logs) exactly what an
    uninterrupted one would."""

    def __init__(self, device, state: dict = None):
        state = state or {}
        self.loss_sum = torch.tensor(state.get('loss_sum', 0.0), dtype=torch.float32, device=device)
        self.window_sum = torch.tensor(state.get('window_sum', 0.0), dtype=torch.float32, device=device)
        self.correct = torch.tensor(state.get('correct', 0), dtype=torch.long, device=device)
        self.seen, self.batches = state.get('seen', 0), state.get('batches', 0)
        self.window_steps = state.get('window_steps', 0)
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """After each step: its mean loss and its outputs. No sync."""
        loss = loss.detach().float()
        self.batches += 1
        self.seen += targets.shape[0]
        self.window_steps += 1
        self.loss_sum += loss * targets.shape[0]
        self.window_sum += loss
        self.correct += (outputs.detach().argmax(1) == targets).sum()

    def window_loss(self, step: int) -> float:
        """The mean loss of the steps since the last call (the one sync); Diverged if it is NaN or infinite."""
        loss = self.window_sum.item() / max(self.window_steps, 1)
        if not math.isfinite(loss):
            raise Diverged(step, loss)
        self.window_sum.zero_()
        self.window_steps = 0
        return loss

    def result(self, step: int) -> EpochResult:
        """The epoch's mean loss and accuracy (its one other sync); Diverged if the loss is not finite."""
        seen = max(self.seen, 1)
        loss, correct = self.loss_sum.item() / seen, self.correct.item()
        if not math.isfinite(loss):
            raise Diverged(step, loss)
        return EpochResult(loss, correct / seen, self.seen, time.perf_counter() - self.start)

    def state_dict(self) -> dict:
        return {'loss_sum': self.loss_sum.item(), 'window_sum': self.window_sum.item(), 'correct': self.correct.item(),
                'seen': self.seen, 'batches': self.batches, 'window_steps': self.window_steps}


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
        if self.confusion is None:
            self.confusion = torch.zeros(classes * classes, dtype=torch.long, device=targets.device)
        # index_add_, unlike bincount, does not ask the GPU how long its result must be: no sync
        self.confusion.index_add_(0, targets * classes + predictions, torch.ones_like(targets))
        self.seen += targets.shape[0]
        self.loss_sum += loss_sum.float()
        self.correct += (predictions == targets).sum()
        if self.keep_outputs:
            self.probabilities.append(outputs.float().softmax(1))
            self.targets.append(targets)

    def result(self) -> EpochResult:
        seen = max(self.seen, 1)
        result = EpochResult(self.loss_sum.item() / seen, self.correct.item() / seen, self.seen, 0.0)
        if self.confusion is not None:
            classes = math.isqrt(self.confusion.numel())
            result.confusion = self.confusion.view(classes, classes).cpu()
        if self.probabilities:
            result.probabilities, result.targets = torch.cat(self.probabilities).cpu(), torch.cat(self.targets).cpu()
        result.seconds = time.perf_counter() - self.start
        return result
