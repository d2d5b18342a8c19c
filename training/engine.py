"""One pass of training and one pass of evaluation (lessons P26-28).

Loss sums and correct counts stay on the device: ``.item()`` makes the CPU wait for the GPU, so it
is called only when something is logged, not at every step as in the tutorial.
"""
from dataclasses import dataclass

import torch


def _identity(images, targets):
    return images, targets


@dataclass
class EpochResult:
    loss: float       # mean loss per image
    accuracy: float   # fraction of images classified correctly
    images: int


def train_one_epoch(model, loss_fn, optimizer, batches, to_device=_identity, amp_dtype=None,
                    log_every: int = 100, on_log=None, step: int = 0):
    """Train on every batch once. ``on_log(step, mean_loss)`` is called every ``log_every`` steps,
    ``step`` counting batches across epochs as the tutorial's ``total_train_step`` does.
    ``amp_dtype`` (e.g. torch.bfloat16) runs the forward pass under autocast. Returns (EpochResult, step)."""
    model.train()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)     # over the epoch
    window_sum = torch.zeros((), device=device)   # since the last log
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    for images, targets in batches:
        images, targets = to_device(images, targets)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(images)
            loss = loss_fn(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        step += 1
        n = targets.shape[0]
        seen += n
        loss_sum += loss.detach() * n
        window_sum += loss.detach()
        correct += (outputs.detach().argmax(1) == targets).sum()
        if step % log_every == 0:
            if on_log is not None:
                on_log(step, window_sum.item() / log_every)  # the one sync, every log_every steps
            window_sum.zero_()
    return EpochResult(loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1), seen), step


@torch.no_grad()
def evaluate(model, loss_fn, batches, to_device=_identity, amp_dtype=None) -> EpochResult:
    """Mean loss per image and accuracy over ``batches`` (the tutorial summed per-batch means)."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    for images, targets in batches:
        images, targets = to_device(images, targets)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(images)
            loss = loss_fn(outputs, targets)
        n = targets.shape[0]
        seen += n
        loss_sum += loss.float() * n
        correct += (outputs.argmax(1) == targets).sum()
    return EpochResult(loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1), seen)
