"""One pass of training and one pass of evaluation (lessons P26-28).

Loss sums and correct counts stay on the device: ``.item()`` makes the CPU wait for the GPU, so it
is called only when something is logged, not at every step as in the tutorial.
"""
import math
from dataclasses import dataclass

import torch


def keep_device(images, targets):
    """The default ``to_device``: batches that already are where the model is."""
    return images, targets


@dataclass
class EpochResult:
    loss: float       # mean loss per image
    accuracy: float   # fraction of images classified correctly
    images: int
    confusion: torch.Tensor = None      # evaluate(): counts, rows = true class, columns = predicted
    probabilities: torch.Tensor = None  # evaluate(keep_outputs=True): N x classes, on the CPU
    targets: torch.Tensor = None        # evaluate(keep_outputs=True): N true classes, on the CPU


class Diverged(ArithmeticError):
    """The training loss became NaN or infinite: the weights are ruined from here on."""

    def __init__(self, step: int, loss: float):
        super().__init__(f'loss became {loss} at step {step}')
        self.step, self.loss = step, loss


class Meter:
    """Running sums over one pass, kept on the device. Saved in a mid-epoch checkpoint, so that a
    resumed epoch reports (and logs) exactly what an uninterrupted one would."""

    def __init__(self, device, state: dict = None):
        state = state or {}
        self.loss_sum = torch.as_tensor(state.get('loss_sum', 0.0), dtype=torch.float32, device=device)
        self.window_sum = torch.as_tensor(state.get('window_sum', 0.0), dtype=torch.float32, device=device)
        self.correct = torch.as_tensor(state.get('correct', 0), dtype=torch.long, device=device)
        self.seen, self.batches = state.get('seen', 0), state.get('batches', 0)

    def state_dict(self) -> dict:
        return {'loss_sum': self.loss_sum.item(), 'window_sum': self.window_sum.item(),
                'correct': self.correct.item(), 'seen': self.seen, 'batches': self.batches}

    def result(self) -> EpochResult:
        seen = max(self.seen, 1)
        return EpochResult(self.loss_sum.item() / seen, self.correct.item() / seen, self.seen)


def train_one_epoch(model, loss_fn, optimizer, batches, to_device=keep_device, amp_dtype=None,
                    log_every: int = 100, on_log=None, step: int = 0, meter: Meter = None,
                    should_stop=None, lr_at=None, clip_grad: float = 0.0):
    """Train on every batch once (or until ``should_stop()`` says so, checked after each step).

    ``step`` counts batches across epochs, like the tutorial's ``total_train_step``; every ``log_every``
    steps the mean loss since the last log goes to ``on_log(step, loss)`` -- the one CPU-GPU sync --
    and a NaN or infinite loss raises Diverged. ``amp_dtype`` (e.g. torch.bfloat16) runs the forward
    pass under autocast. ``lr_at(step)``, if given, sets the learning rate of each step (a schedule);
    ``clip_grad`` > 0 scales the gradients down to at most that norm (no sync: the norm stays on the
    device). Returns (meter, step); ``meter.result()`` gives the epoch's EpochResult."""
    model.train()
    meter = meter or Meter(next(model.parameters()).device)
    device_type = meter.loss_sum.device.type
    for images, targets in batches:
        images, targets = to_device(images, targets)
        with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(images)
            loss = loss_fn(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        if lr_at is not None:
            for group in optimizer.param_groups:
                group['lr'] = lr_at(step)
        optimizer.step()

        step += 1
        meter.batches += 1
        meter.seen += targets.shape[0]
        meter.loss_sum += loss.detach() * targets.shape[0]
        meter.window_sum += loss.detach()
        meter.correct += (outputs.detach().argmax(1) == targets).sum()
        if step % log_every == 0:
            window_loss = meter.window_sum.item() / log_every
            if not math.isfinite(window_loss):
                raise Diverged(step, window_loss)
            if on_log is not None:
                on_log(step, window_loss)
            meter.window_sum.zero_()
        if should_stop is not None and should_stop():
            break
    return meter, step


@torch.no_grad()
def evaluate(model, loss_fn, batches, to_device=keep_device, amp_dtype=None, keep_outputs=False) -> EpochResult:
    """Mean loss per image (the tutorial summed per-batch means), accuracy and the confusion matrix over
    ``batches``; with ``keep_outputs`` also every image's class probabilities."""
    model.eval()
    meter = Meter(next(model.parameters()).device)
    confusion, outputs_kept, targets_kept = None, [], []
    for images, targets in batches:
        images, targets = to_device(images, targets)
        with torch.autocast(meter.loss_sum.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(images)
            loss = loss_fn(outputs, targets)
        classes = outputs.shape[1]
        predictions = outputs.argmax(1)
        if confusion is None:
            confusion = torch.zeros(classes * classes, dtype=torch.long, device=targets.device)
        confusion += torch.bincount(targets * classes + predictions, minlength=classes * classes)
        meter.seen += targets.shape[0]
        meter.loss_sum += loss.float() * targets.shape[0]
        meter.correct += (predictions == targets).sum()
        if keep_outputs:
            outputs_kept.append(outputs.float().softmax(1))
            targets_kept.append(targets)
    result = meter.result()
    if confusion is not None:
        result.confusion = confusion.view(classes, classes).cpu()
    if keep_outputs and outputs_kept:
        result.probabilities, result.targets = torch.cat(outputs_kept).cpu(), torch.cat(targets_kept).cpu()
    return result
