"""Where a run stands (its step, the epoch it is in, the best accuracy so far), what last.pth saves of it,
and how --resume puts it back, so that a resumed run ends with exactly the weights an uninterrupted one has.
The data order and the augmentation need no saving: they follow from (seed, epoch)."""
import os
from dataclasses import dataclass, field

import torch

from .checkpoint import mismatch, model_bundle, on_the_cpu
from .distributed import unwrap
from .errors import UserError
from .paths import shown


@dataclass
class Progress:
    step: int = 0      # training steps since the start: the tutorial's total_train_step
    epoch: int = 0     # the epoch to train next (the one under way, if it was interrupted)
    meter: dict = None  # the running sums of an epoch interrupted in the middle, to continue from
    best: dict = field(default_factory=lambda: {'accuracy': -1.0, 'epoch': -1})
    last_test: dict = field(default_factory=lambda: {'epoch': -1, 'test_accuracy': None, 'test_loss': None})
    run_dir: str = None  # the run's TensorBoard folder, kept by a resumed run (in last.pth: in full, so that a
    # run resumed from another folder finds it)
    resumed_from: str = None  # the last.pth that --resume continues
    history: list = field(default_factory=list)  # one dict per epoch trained in this process
    scaler: object = None  # fp16's gradient scaler, whose scale last.pth keeps

    def end_epoch(self, epoch: int, train, test) -> None:
        """Record a finished epoch, and whether its test accuracy is the best so far (a tie is not)."""
        self.epoch, self.meter = epoch + 1, None
        self.last_test = {'epoch': epoch, 'test_accuracy': test.accuracy, 'test_loss': test.loss}
        self.history.append({'epoch': epoch, 'train_loss': train.loss, 'train_accuracy': train.accuracy,
                             'train_images': train.images, 'train_seconds': train.seconds,
                             'test_loss': test.loss, 'test_accuracy': test.accuracy, 'test_images': test.images,
                             'test_seconds': test.seconds})
        if test.accuracy > self.best['accuracy']:
            self.best = {'accuracy': test.accuracy, 'epoch': epoch}


def restore(resumed, model, optimizer, classes, scaler=None) -> Progress:
    """A new run's Progress; with --resume, the interrupted run's, after putting its weights, its
    optimizer state (momentum), fp16's loss scale and its random number generators' states back."""
    if resumed is None:
        return Progress(scaler=scaler)
    source = resumed['path']
    if list(resumed['classes']) != list(classes):
        raise UserError(f'{source} was trained on other classes ({", ".join(resumed["classes"][:5])} ...) '
                        f'than this data set ({", ".join(classes[:5])} ...): check --data-dir')
    problem = mismatch(model, resumed['model'])
    if problem:
        raise UserError(f'{source} does not fit this model ({problem})')
    unwrap(model).load_state_dict(resumed['model'])  # copied onto the model's device (in every process)
    steps_as = [{k: group[k] for k in ('fused', 'foreach') if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(resumed['optimizer'])  # its state follows the parameters' device ...
    for group, how in zip(optimizer.param_groups, steps_as):  # ... and how it steps is this machine's choice
        group.update(how)  # (a GPU run's fused kernels, continued on the CPU, and the other way round)
    if scaler is not None and resumed.get('scaler'):
        scaler.load_state_dict(resumed['scaler'])
    torch.set_rng_state(resumed['rng']['torch'].cpu())
    saved_cuda = resumed['rng'].get('cuda') or []
    for index in range(min(len(saved_cuda), torch.cuda.device_count())):  # a machine may have fewer GPUs
        torch.cuda.set_rng_state(saved_cuda[index].cpu(), index)
    return Progress(step=resumed['step'], epoch=resumed['resume']['epoch'], meter=resumed['resume']['meter'],
                    best=resumed['best'], last_test={k: resumed[k] for k in Progress().last_test},
                    run_dir=resumed['run_dir'] and str(shown(resumed['run_dir'])), resumed_from=source, scaler=scaler)


def training_state(weights: dict, optimizer, progress: Progress, epoch: int, meter_state, **bundle) -> dict:
    """last.pth: the weights (on the CPU, see checkpoint.cpu_weights) and everything needed to continue at epoch
    ``epoch``, all on the CPU; ``meter_state`` is set when that epoch is already under way. ``bundle``: classes,
    config and normalize, as in best.pth."""
    rng = {'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        rng['cuda'] = torch.cuda.get_rng_state_all()
    scaler = progress.scaler.state_dict() if progress.scaler is not None and progress.scaler.is_enabled() else None
    return model_bundle(weights, **bundle, **progress.last_test, step=progress.step,
                        optimizer=on_the_cpu(optimizer.state_dict()),
                        best=progress.best, run_dir=progress.run_dir and os.path.abspath(progress.run_dir),
                        rng=rng, scaler=scaler, resume={'epoch': epoch, 'meter': meter_state})
