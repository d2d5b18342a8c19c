"""A training run's settings, resolved once, in this order: the flags given; the --recipe defaults of the
flags not given; with --resume, the settings of the run being continued (read from its last.pth, which is
also returned, so that nothing reads it twice); --dry-run's scratch folders; the project's own folders.

    args, resumed = training_settings(argv, __file__, __doc__, epochs=30)

The result is read-only: nothing changes a setting behind the script's back.
"""
import argparse
import atexit
import shutil
import tempfile
from pathlib import Path

from .checkpoint import read_training_state
from .cli import training_parser
from .errors import UserError
from .paths import project_path
from .recipe import RECIPES, SETTINGS, apply_recipe, saved_views

# what a resumed run keeps from the interrupted one, whatever the command line says
RESUMED_SETTINGS = ('recipe', *SETTINGS, 'seed', 'val_size', 'precision', 'channels_last', 'log_interval',
                    'deterministic')
DRY_RUN_EPOCHS = 2


class Settings(argparse.Namespace):
    """argparse's Namespace, read-only."""

    def __init__(self, values: dict):
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f'settings are resolved once and read-only: cannot set {name}')

    __delattr__ = __setattr__


def training_settings(argv, script: str, description: str, epochs: int, device_flag: bool = False) -> tuple:
    """(settings, the checkpoint --resume continues or None), from the command line ``argv`` of ``script``
    (a path: its file name names the run and goes into the resume hint)."""
    args = training_parser(Path(script).name, description, epochs, device_flag).parse_args(argv)
    args.script = Path(script).name
    epochs_given = args.epochs is not None
    args.epochs = args.epochs or epochs
    apply_recipe(args)
    resumed = None
    if args.resume:
        if args.dry_run:
            raise UserError('--dry-run checks the setup from scratch and cannot --resume; drop one of them')
        resumed = read_training_state(args.resume, Path(args.checkpoint_dir or project_path('model')))
        take_resumed_settings(args, resumed, epochs_given)
    if args.nesterov and args.momentum == 0:
        raise UserError('--nesterov needs momentum: give --momentum (e.g. 0.9) or --no-nesterov')
    if args.whiten_conv1 and not args.muon_lr:
        raise UserError('--whiten-conv1 shapes Muon\'s steps: give --muon-lr too (e.g. 0.02) or --whiten-conv1 0')
    if args.dry_run:  # the real model/ and logs/ stay untouched unless asked otherwise
        scratch = tempfile.mkdtemp(prefix='dry-run-')
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        args.checkpoint_dir = args.checkpoint_dir or str(Path(scratch) / 'model')
        args.log_dir = args.log_dir or str(Path(scratch) / 'logs')
        args.epochs = min(args.epochs, DRY_RUN_EPOCHS)
    # the project's own folders, beside the scripts, whatever the current folder (see paths.py)
    args.data_dir = args.data_dir or str(project_path('dataset'))
    args.checkpoint_dir = args.checkpoint_dir or str(project_path('model'))
    args.log_dir = args.log_dir or str(project_path('logs'))
    return Settings(vars(args)), resumed


def take_resumed_settings(args, resumed: dict, epochs_given: bool) -> None:
    """--resume: the settings the weights were trained with replace those of the command line; the run goes on
    to its own last epoch, or with --epochs to that total (a learning rate schedule cannot be stretched)."""
    config, path = resumed['config'], resumed['path']
    if not epochs_given:
        args.epochs = config['epochs']
    before_recipes = {'recipe': 'tutorial', 'val_size': 0, 'deterministic': False,  # older checkpoints lack these
                      **RECIPES['tutorial'], 'tta_views': saved_views(config)}
    for key in RESUMED_SETTINGS:
        setattr(args, key, config[key] if key in config else before_recipes[key])
    if args.schedule != 'constant' and args.epochs != config['epochs']:
        if resumed['resume']['epoch'] >= config['epochs']:
            raise UserError(f'--resume: {path} finished all {config["epochs"]} epochs of its {args.schedule} '
                            f'learning rate schedule, which cannot be stretched; for {args.epochs} epochs start '
                            f'a new run (without --resume)')
        if not args.quiet:  # part of reading the command line, like argparse's own messages
            print(f'note: training to epoch {config["epochs"]}, where the interrupted run\'s learning rate '
                  f'schedule ends')
        args.epochs = config['epochs']
