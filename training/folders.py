"""The two folders a training run writes into.

- Its checkpoint folder (``--checkpoint-dir``, default ``model/``), which it owns while it trains: a lock on
  ``model/.training.lock`` that the operating system drops when the process ends, even by ``kill -9``, so a
  second run into the same folder stops at once instead of overwriting the first one's files.
- Its TensorBoard run folder, ``logs/<run name>/``: always a new one, made with one ``mkdir`` that fails when
  the folder exists, so two runs started in the same second still get two folders.
In a run of several processes (train_ddp.py), rank 0 alone writes them.
"""
import itertools
import os
import tempfile
import time
from datetime import datetime
from pathlib import Path

from .checkpoint import cpu_weights, model_bundle, save_checkpoint
from .distributed import is_main_process, world_size
from .errors import UserError
from .paths import command, is_project_path, project_path
from .platforms import lock_file
from .progress import Progress, training_state

LOCK_FILE = '.training.lock'


def config_of(args) -> dict:
    """The run's settings, as plain values that can go into a weights_only checkpoint."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) or v is None}


class CheckpointFolder:
    """The checkpoint folder while a run trains into it (``with CheckpointFolder(...) as checkpoints``)."""

    def __init__(self, args, classes, normalize):
        self.path, self.script, self.data_dir = Path(args.checkpoint_dir), args.script, args.data_dir
        # what every bundle holds besides the weights: enough to use them (see checkpoint.py)
        self.bundle = {'classes': list(classes), 'config': config_of(args), 'normalize': normalize}
        self.lock, self.writes = None, is_main_process()  # several processes: rank 0 writes
        self.resumable = bool(args.resume)  # whether last.pth holds this run's state (that --resume continues)

    def __enter__(self):
        """Check that checkpoints can be written here (before training, not after the first epoch), take the
        folder, and remove the temporary files a killed run may have left."""
        if not self.writes:
            return self
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.path, prefix='.write-test-')
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise UserError(f'cannot write checkpoints to {self.path}/ ({e.strerror or e}); '
                            f'choose another --checkpoint-dir') from None
        self.lock = take_lock(self.path / LOCK_FILE, f'pid {os.getpid()}, {self.script}, started '
                              f'{datetime.now():%Y-%m-%d %H:%M:%S}')
        for stale in self.path.glob('.*.pth.*.tmp'):  # only now: another run's files are its own business
            stale.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc):
        if self.lock:
            self.lock.close()  # closing the file releases the lock

    def save_epoch(self, epoch: int, model, optimizer, progress: Progress) -> Path:
        """After epoch ``epoch``: model_{epoch}.pth, best.pth when it is the best so far, and last.pth, in that
        order: last.pth moves on only once the others are written, so that a --resume after any failure here
        trains this epoch again and writes them all."""
        path = self.path / f'model_{epoch}.pth'
        if not self.writes:
            return path
        weights = cpu_weights(model)  # copied off the device once, for all three files
        bundle = model_bundle(weights, **self.bundle, **progress.last_test, step=progress.step)
        # the tutorial's plain state_dict, unless the images must be normalised to use the weights
        self.save(bundle if self.bundle['normalize'] else weights, path)
        if progress.best['epoch'] == epoch:
            self.save(bundle, self.path / 'best.pth')
        self.save_last(model, optimizer, progress, weights=weights)
        return path

    def save_last(self, model, optimizer, progress: Progress, meter=None, weights=None) -> None:
        """last.pth: the whole training state; ``meter`` is the epoch under way, when it was interrupted."""
        meter_state = meter and meter.state_dict()  # in every process: it sums over them
        if self.writes:
            weights = cpu_weights(model) if weights is None else weights
            state = training_state(weights, optimizer, progress, progress.epoch, meter_state, **self.bundle)
            self.save(state, self.path / 'last.pth')
            self.resumable = True

    def save(self, obj, path: Path) -> None:
        save_checkpoint(obj, path, f'continue with: {self.resume_command()} ({self.path / "last.pth"} is complete)'
                        if self.resumable else 'start the run again')

    def resume_hint(self, step: int) -> str:
        return (f'interrupted: training state saved in {self.path / "last.pth"} (step {step}); '
                f'continue with: {self.resume_command()}')

    def resume_command(self) -> str:
        """The command that continues this run, as it works when pasted where the learner stands."""
        start = ['python'] if world_size() == 1 else ['torchrun', '--standalone', f'--nproc-per-node={world_size()}']
        where = [] if is_project_path(self.path, 'model') else ['--checkpoint-dir', self.path]
        data = [] if is_project_path(self.data_dir, 'dataset') else ['--data-dir', self.data_dir]
        return command(*start, project_path(self.script), '--resume', *where, *data)


def take_lock(path: Path, holder: str):
    """An exclusive lock on ``path``, held until the returned file is closed or the process ends;
    a UserError naming the holder when another process has it."""
    lock = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o666), 'r+')
    try:
        lock_file(lock, wait=False)
    except OSError:
        other = ''
        for _ in range(20):  # the holder writes its name right after taking the lock: give it a moment
            lock.seek(0)
            other = lock.read().strip()
            if other:
                break
            time.sleep(0.05)
        lock.close()
        raise UserError(f'{path.parent}/ is in use by another training run ({other or "just started"}); '
                        f'wait for it to end, or give this run a --checkpoint-dir of its own') from None
    lock.seek(0)
    lock.truncate()
    lock.write(holder + '\n')
    lock.flush()
    return lock


def new_run_dir(log_dir, run_name, script: str) -> Path:
    """log_dir/<run name>/, made now; a name already taken gets -2, -3, ... Raises OSError when log_dir
    cannot be made."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    name = run_name or f'{datetime.now():%Y%m%d-%H%M%S}-{Path(script).stem}'
    for n in itertools.count(1):
        path = log_dir / (name if n == 1 else f'{name}-{n}')
        try:
            path.mkdir()  # atomic: of two runs asking for the same name, one gets it
            return path
        except FileExistsError:
            continue
