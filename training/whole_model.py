"""Checkpoints saved the way the original lessons save them: the whole model object,
``torch.save(tudui, "tudui_{}.pth".format(i))``, with the class ``Tudui`` defined in the learner's own files.

Loading such a file with ``torch.load`` rebuilds the object, which needs the class (``Can't get attribute
'Tudui'``) and means running whatever code the file names -- which is why PyTorch 2.6 stopped doing it by
default. Here, no class the file names is imported or run: torch's own ``weights_only`` loader reads it,
and every class it names (``__main__.Tudui``, ``torch.nn.modules.conv.Conv2d``, ...) is stood in for by
an empty ``Stand-in`` that only keeps the attribute dictionary the file holds. The tensors are rebuilt by
what ``weights_only`` itself allows; then the parameters are collected, in the model's order, and taken
for MyModel's layers when their shapes are MyModel's, in the same order -- whatever the attribute is called
(``model`` in lesson P26, ``model1`` in P22, or one attribute per layer).
"""
import pickle
import re

import torch

from .errors import UserError

CLASS_NAME = re.compile(r'[A-Za-z_][\w.]*\.[A-Z]\w*')  # module.path.ClassName


class StandIn:
    """What a class named in the file becomes: an empty object that keeps the state the file gives it.
    Calling it (as a file that wants to run code does: ``os.system(...)``) is refused."""
    qualified_name = '?'

    def __init__(self, *args, **kwargs):
        raise pickle.UnpicklingError(f'the file calls {self.qualified_name}(...)')

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}


def stand_ins(names: list) -> list:
    """One StandIn subclass per 'module.Name' (what ``torch.serialization.safe_globals`` takes)."""
    return [(type(name.rsplit('.', 1)[1], (StandIn,), {'qualified_name': name}), name) for name in names]


def parameters_of(module: StandIn, prefix: str = '') -> list:
    """(dotted name, tensor) of a saved module's parameters and persistent buffers, in ``state_dict`` order."""
    state = module.state
    found = [(prefix + name, t) for name, t in (state.get('_parameters') or {}).items() if t is not None]
    skipped = state.get('_non_persistent_buffers_set') or set()
    found += [(prefix + name, t) for name, t in (state.get('_buffers') or {}).items()
              if t is not None and name not in skipped]
    for name, child in (state.get('_modules') or {}).items():
        if isinstance(child, StandIn):
            found += parameters_of(child, f'{prefix}{name}.')
    return found


def load_whole_model(path, names: list, model_keys: list, model_shapes) -> dict:
    """The weights of a whole model saved in ``path`` (which names the classes ``names``), as a state_dict
    with MyModel's keys ``model_keys``; ``model_shapes(num_classes)`` gives MyModel's shapes, in order.
    A one-line UserError when the file is not a whole model or its weights do not fit MyModel."""
    calls = [n for n in names if not CLASS_NAME.fullmatch(n)]
    if calls:
        raise UserError(f'refused to load {path}: loading it would call {", ".join(calls[:3])} (code, not '
                        f'weights); only load checkpoints you trust')
    try:
        with torch.serialization.safe_globals(stand_ins(names)):
            obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        cause = re.search(r'the file calls [\w.]+\(\.\.\.\)', str(e))
        raise UserError(f'refused to load {path}: {cause[0] if cause else "it holds objects that are not weights"}'
                        f' (code, not weights); only load checkpoints you trust') from None
    if not isinstance(obj, StandIn) or '_modules' not in obj.state:
        raise UserError(f'{path} holds a {type(obj).__name__}, not a model or its weights')
    found = parameters_of(obj)
    shapes = [tuple(t.shape) for _, t in found]
    heads = [shape for shape in shapes if len(shape) == 2]  # the last linear layer: classes x 64
    expected = model_shapes(heads[-1][0] if heads else 10)
    if shapes != expected:
        held = ', '.join(f'{name} {list(t.shape)}' for name, t in found[:4]) + (' ...' if len(found) > 4 else '')
        raise UserError(f'{path} holds a whole {type(obj).__name__} model whose {len(found)} weight tensors do not '
                        f'fit MyModel\'s {len(expected)} ({held or "none"}): it is another network')
    state_dict = {key: t.detach().clone().contiguous() for key, (_, t) in zip(model_keys, found)}
    return {'model': state_dict, 'classes': None,
            'whole_model': {'class': type(obj).__name__, 'names': [name for name, _ in found]}}
