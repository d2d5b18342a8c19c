"""Checkpoints: written atomically, read back with ``torch.load(..., weights_only=True)``.

Files in the checkpoint folder (default ``model/``):
    model_{i}.pth   after epoch i (from 0), the tutorial's plain ``state_dict``: any old code loads it;
                    with --normalize, a bundle like best.pth (its 'model' is that state_dict)
    best.pth        the epoch with the best test accuracy, with class names, the normalisation
                    statistics ('normalize': mean and std, or None) and the run's settings
    last.pth        the latest epoch, likewise, plus the whole training state
Only tensors, numbers and strings go in, so loading never has to trust a pickle.
"""
import codecs
import pickle
from pathlib import Path

import torch

from model import MyModel

from .data import CIFAR10_CLASSES
from .distributed import unwrap
from .errors import UserError
from .files import atomic_save
from .platforms import REPLACE_PATIENCE, FileInUse
from .whole_model import load_whole_model

FORMAT = 'mymodel-checkpoint-v1'


def save_checkpoint(obj, path, then: str = 'run again') -> None:
    """Save atomically; a folder that cannot be written, a full disk or a file that another program keeps
    open is a one-line UserError (``then``: what the learner does after closing that program)."""
    try:
        atomic_save(obj, path)
    except FileInUse:
        raise UserError(f'cannot replace {path}: another program is using it (an antivirus scan, OneDrive or another '
                        f'sync tool, or a program that has it open) and kept it locked for {REPLACE_PATIENCE:g}s; '
                        f'close that program, then {then}') from None
    except OSError as e:
        raise UserError(f'cannot write {path} ({e.strerror or e}); free some space or choose another '
                        f'--checkpoint-dir (the checkpoints already there are intact)') from None


def on_the_cpu(obj):
    """``obj`` -- a state_dict, an optimizer's state, lists and dicts of them -- with every tensor copied to the
    CPU: a checkpoint written on a GPU then loads anywhere, also with code that passes no map_location."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {key: on_the_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_the_cpu(value) for value in obj)
    return obj


def cpu_weights(model) -> dict:
    """MyModel's state_dict (also out of DistributedDataParallel), on the CPU: one copy, at save time."""
    return on_the_cpu(unwrap(model).state_dict())


def model_bundle(weights: dict, classes, **info) -> dict:
    """A self-describing checkpoint: the weights (see cpu_weights) plus what is needed to use them."""
    return {'format': FORMAT, 'model': weights, 'classes': list(classes), **info}


def load_checkpoint(path, device='cpu') -> dict:
    """Read a checkpoint of this project, the tutorial's plain state_dict, or a whole model saved the lessons'
    way (``torch.save(tudui, ...)``, see whole_model.py), onto ``device``.

    Returns a dict with at least 'model' (a state_dict) and 'classes' (names, or None if unknown).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f'checkpoint {path} not found' + (' (it is a folder)' if path.is_dir() else ''))
    what = not_a_checkpoint(path)
    if what:
        raise UserError(f'{path} is not a PyTorch checkpoint: {what}; give a .pth file saved by torch.save')
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:  # it names classes or functions: a whole model, or code
        obj = load_whole_model(path, named_globals(path), list(MyModel().state_dict()), model_shapes)
        obj['model'] = {k: v.to(device) for k, v in obj['model'].items()}
    except Exception as e:  # truncated zip, random bytes ...
        raise UserError(f'{path} is not a readable PyTorch checkpoint (truncated or damaged?): '
                        f'{type(e).__name__}') from None
    if isinstance(obj, dict) and (obj.get('format') == FORMAT or 'whole_model' in obj):
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {'model': obj, 'classes': None}  # the tutorial's plain state_dict
    raise UserError(f'{path} is not a MyModel checkpoint (expected a state_dict or a checkpoint of this project)')


SIGNATURES = [(b'\xff\xd8\xff', 'it is a JPEG image'), (b'\x89PNG', 'it is a PNG image'),
              (b'GIF8', 'it is a GIF image'),
              (b'RIFF', 'it is a RIFF file (WebP image, WAV sound ...)'), (b'%PDF', 'it is a PDF document'),
              (b'\x1f\x8b', 'it is a gzip archive'), (b'BM', 'it is a BMP image')]


def not_a_checkpoint(path: Path):
    """What the file is instead, when its first bytes show it is no checkpoint (None: it may be one).
    torch.save writes a zip archive, or (before PyTorch 1.6) a pickle, which starts with byte 0x80."""
    with open(path, 'rb') as f:
        head = f.read(512)
    if not head:
        return 'it is empty (0 bytes)'
    if head.startswith(b'PK\x03\x04') or head[0] == 0x80:
        return None
    for signature, what in SIGNATURES:
        if head.startswith(signature):
            return what
    try:
        codecs.getincrementaldecoder('utf-8')().decode(head)  # (a character cut off at byte 512 is no error)
        return 'it is a text file'
    except UnicodeDecodeError:
        return None


def named_globals(path: Path) -> list:
    """The classes and functions a checkpoint names, read without loading it."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:
        raise UserError(f'{path} is not a readable PyTorch checkpoint (truncated or damaged?): '
                        f'{type(e).__name__}') from None


def model_shapes(num_classes: int) -> list:
    """MyModel's weight shapes, in state_dict order."""
    return [tuple(t.shape) for t in MyModel(num_classes).state_dict().values()]


def mismatch(model, state_dict: dict):
    """None if ``state_dict`` fits ``model``, else which keys are missing or unexpected and which shapes differ."""
    expected = unwrap(model).state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [f'{k} {list(state_dict[k].shape)} vs {list(v.shape)}'
                   for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    parts = [f'{label}: {", ".join(items[:4])}{" ..." if len(items) > 4 else ""}'
             for label, items in (('missing keys', missing), ('unexpected keys', unexpected),
                                  ('shapes differ (checkpoint vs model)', wrong_shape)) if items]
    return '; '.join(parts) or None


def build_model(state_dict: dict, source='checkpoint') -> MyModel:
    """A MyModel with the checkpoint's weights and number of classes; a mismatch names keys and shapes."""
    head = state_dict.get('model.8.weight')
    model = MyModel(head.shape[0] if isinstance(head, torch.Tensor) and head.dim() == 2 else 10)
    problem = mismatch(model, state_dict)
    if problem:
        raise UserError(f'{source} does not fit MyModel ({problem}): is it from another network?')
    model.load_state_dict(state_dict)
    return model


def class_names(checkpoint: dict, num_classes: int) -> list:
    """The checkpoint's class names; a plain 10-class state_dict is taken to be CIFAR-10."""
    if checkpoint.get('classes'):
        return list(checkpoint['classes'])
    if num_classes == len(CIFAR10_CLASSES):
        return list(CIFAR10_CLASSES)
    return [f'class {i}' for i in range(num_classes)]


def read_training_state(resume: str, checkpoint_dir: Path) -> dict:
    """The last.pth that --resume continues ('latest': checkpoint_dir/last.pth), read onto the CPU; its
    'path' says where it came from. The weights go to the device when they are loaded into the model."""
    path = checkpoint_dir / 'last.pth' if resume == 'latest' else Path(resume)
    if resume == 'latest' and not path.is_file():
        raise UserError(f'--resume: nothing to resume, there is no {path} (start without --resume, or '
                        f'give --checkpoint-dir or --resume PATH)')
    checkpoint = load_checkpoint(path, 'cpu')
    if 'resume' not in checkpoint:
        raise UserError(f'--resume {path}: it holds weights only, no training state; resume from a '
                        f'last.pth written by the training scripts')
    return {**checkpoint, 'path': str(path)}


def newest_checkpoint(folder) -> Path:
    """The most recently written .pth file in ``folder``."""
    folder = Path(folder)
    candidates = sorted(folder.glob('*.pth'), key=lambda p: (p.stat().st_mtime_ns, p.name)) \
        if folder.is_dir() else []
    if not candidates:
        raise UserError(f'no checkpoint (*.pth) in {folder}/: train first (python train_gpu_2.py) '
                        f'or pass --checkpoint PATH')
    return candidates[-1]
