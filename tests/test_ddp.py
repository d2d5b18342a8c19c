"""train_ddp.py under torchrun: 2 processes on the CPU (gloo), as the README's command starts them.

Equivalence with one process: N processes take their shares of the same global batches, so the weights
differ from one process's only by the order in which floats are added (the gradient is summed as two
half-batch means, weighted by their shares; each process uses one thread). Measured after the runs below
(18 and 63 steps; weights up to ~0.13 in size): 1.2e-6 and 1.9e-6, the kind of difference there is between
one process's runs on 1 and on 2 threads (3e-7). It grows with the steps, as any rounding difference does
in training (1.2e-5 after 126 steps), so the runs compared stay at a few dozen steps, and TOLERANCE is 10x
the measured difference. The check can fail: averaging the two halves of the uneven last batches without
weighting them by their shares (DistributedDataParallel's default) ends the stream run 1.4e-4 away.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (ROOT, load_weights, posix_only, run_main, run_script, scalars, script_env, script_path,
                      write_cifar10, write_image_folders)

pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='torchrun with gloo: tested on Linux')

TOLERANCE = 2e-5
FLAGS = ('--batch-size', 16, '--precision', 'fp32', '--log-interval', 5, '--quiet')
SLOW = ('--epochs', 2, '--batch-size', 32, '--precision', 'fp32', '--log-interval', 20)


def torchrun_command(*args, cwd: Path, nproc: int = 2) -> list:
    """Each process's exit code goes into exit-<rank> (see record_exit.py); the script is a copy of the
    project's in ``cwd`` (its default folders there, see script_path)."""
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc-per-node={nproc}',
            str(Path(__file__).parent / 'record_exit.py'), str(script_path('train_ddp.py', cwd)), '--device', 'cpu',
            *map(str, args)]


def exit_codes(folder: Path) -> list:
    """What each process of the last torchrun in ``folder`` exited with, by rank."""
    return [int((folder / f'exit-{rank}').read_text()) for rank in range(2)]


def torchrun(*args, cwd: Path, nproc: int = 2, check: bool = True, timeout: float = 120):
    """``torchrun --standalone --nproc-per-node=2 train_ddp.py --device cpu ARGS`` (free ports, gloo)."""
    process = start_torchrun(*args, cwd=cwd, nproc=nproc)
    out, err = finish(process, timeout)
    result = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    if check and result.returncode != 0:
        raise AssertionError(f'torchrun exited {result.returncode}\n{result.stdout}\n{result.stderr}')
    return result


def start_torchrun(*args, cwd: Path, nproc: int = 2) -> subprocess.Popen:
    return subprocess.Popen(torchrun_command(*args, cwd=cwd, nproc=nproc), cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=script_env(OMP_NUM_THREADS='1', USE_LIBUV='0' if os.name == 'nt' else None))


def finish(process: subprocess.Popen, timeout: float) -> tuple:
    """(stdout, stderr) of a torchrun once it ends; past ``timeout``, it and its processes (which torchrun
    starts in sessions of their own, so that they outlive it) are killed and the test fails."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in workers(process.pid):
            os.kill(pid, signal.SIGKILL)
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f'torchrun did not end within {timeout}s; killed\n{out}\n{err}') from None


def weights(path: Path) -> dict:
    checkpoint = load_weights(path)
    return checkpoint.get('model', checkpoint) if 'format' in checkpoint else checkpoint


def largest_difference(a: Path, b: Path) -> float:
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()  # MyModel's own keys, no 'module.'
    return max((a[k] - b[k]).abs().max().item() for k in a)


def our_tracebacks(stderr: str) -> bool:
    """A traceback from train_ddp.py's processes (torchrun itself prints one whenever a process fails)."""
    return re.search(r'File "[^"]*(train_ddp\.py|[/\\]training[/\\][^"]*)", line', stderr) is not None


def lines_starting(text: str, prefix: str) -> list:
    return [line for line in text.splitlines() if line.startswith(prefix)]


@pytest.fixture(scope='module')
def odd_folders(tmp_path_factory) -> Path:
    """3 x 45 training images: with --batch-size 16 the last batch (7) splits unevenly, 4 and 3."""
    return write_image_folders(tmp_path_factory.mktemp('odd'), train=45, test=13)


@pytest.fixture(scope='module')
def one_and_two(cifar_dir, odd_folders, tmp_path_factory) -> dict:
    """The same runs in one process (train_gpu_2.py) and in two (train_ddp.py): {case: (one, two)} folders.
    memory: CIFAR-10's files, the tutorial recipe, decoded into memory; stream: image folders through the
    DataLoader, the fast recipe (each image mirrored every other epoch, normalisation, label smoothing, one-cycle)
    with SGD for every weight: Muon sets every singular value of a step to about 1, so the rounding differences in a
    step's weakest directions come out as large as its strongest ones (4.2e-4 after these 18 steps, more than
    the unweighted average's 1.4e-4): with it, this check could no longer tell the two apart."""
    cases = {'memory': ('--epochs', 1, '--data-dir', cifar_dir, '--loader', 'memory'),  # 63 steps
             'stream': ('--epochs', 2, '--data-dir', odd_folders, '--loader', 'stream',  # 18 steps
                        '--recipe', 'fast', '--alternate-flip', '--lr', 0.05, '--muon-lr', 0)}
    done = {}
    for case, flags in cases.items():
        one, two = (tmp_path_factory.mktemp(f'{case}-{n}') for n in ('one', 'two'))
        run_main('train_gpu_2.py', *FLAGS, *flags, '--device', 'cpu', '--run-name', 'run', cwd=one)
        result = torchrun(*FLAGS, *flags, '--run-name', 'run', cwd=two)
        assert 'Traceback' not in result.stderr
        done[case] = one, two
    return done


@pytest.mark.parametrize('case', ['memory', 'stream'])
def test_two_processes_end_with_the_weights_of_one(one_and_two, case):
    one, two = one_and_two[case]
    for path in (one / 'model').glob('*.pth'):
        assert largest_difference(path, two / 'model' / path.name) < TOLERANCE
    last_one, last_two = (load_weights(folder / 'model' / 'last.pth') for folder in (one, two))
    assert last_two['step'] == last_one['step']
    assert last_two['test_accuracy'] == pytest.approx(last_one['test_accuracy'], abs=1e-9)  # the whole test set
    assert last_two['test_loss'] == pytest.approx(last_one['test_loss'], rel=1e-4)


def test_one_run_folder_whatever_the_number_of_processes(one_and_two):
    one, two = one_and_two['memory']
    assert [p.name for p in (two / 'logs').iterdir()] == ['run']
    assert sorted(p.name for p in (two / 'model').iterdir()) == sorted(p.name for p in (one / 'model').iterdir())
    # train_loss: the mean over all processes' images, as one process computes it
    a, b = scalars(one / 'logs' / 'run', 'train_loss'), scalars(two / 'logs' / 'run', 'train_loss')
    assert [s for s, _ in a] == [s for s, _ in b]
    assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-4)
    test_accuracy = [value for _, value in scalars(one / 'logs' / 'run', 'test_accuracy')]
    assert [value for _, value in scalars(two / 'logs' / 'run', 'test_accuracy')] == pytest.approx(test_accuracy)
    events = b''.join(path.read_bytes() for path in (two / 'logs' / 'run').rglob('events.out.tfevents.*'))
    assert b'world_size' in events  # among the hparams


def test_without_torchrun_it_is_one_process_and_trains_as_train_gpu_2(one_and_two, cifar_dir, tmp_path):
    one, _ = one_and_two['memory']
    result = run_script('train_ddp.py', *FLAGS, '--epochs', 1, '--data-dir', cifar_dir, '--loader', 'memory',
                        '--device', 'cpu', cwd=tmp_path)
    assert 'Traceback' not in result.stderr
    assert largest_difference(tmp_path / 'model' / 'last.pth', one / 'model' / 'last.pth') == 0.0


@pytest.mark.parametrize('trained_by', ['one', 'two'])
def test_checkpoints_continue_in_either_script(one_and_two, trained_by, cifar_dir, tmp_path):
    """The run of one epoch, continued for a second by train_gpu_2.py --resume and by train_ddp.py --resume
    (a one-process run continued in two processes, a DDP run in one): the two end alike."""
    one, two = one_and_two['memory']
    folder = one if trained_by == 'one' else two
    for copy in ('by-one', 'by-two'):
        shutil.copytree(folder / 'model', tmp_path / copy)
    again = (*FLAGS, '--epochs', 2, '--data-dir', cifar_dir, '--resume')
    run_main('train_gpu_2.py', *again, '--device', 'cpu', '--checkpoint-dir', 'by-one', cwd=tmp_path)
    result = torchrun(*again, '--checkpoint-dir', 'by-two', cwd=tmp_path)
    assert 'Traceback' not in result.stderr
    assert largest_difference(tmp_path / 'by-one' / 'model_1.pth', tmp_path / 'by-two' / 'model_1.pth') < TOLERANCE
    result = run_main('test.py', ROOT / 'images' / 'cat.jpg', '--checkpoint', two / 'model' / 'best.pth',
                      cwd=tmp_path)  # test.py reads a DDP run's checkpoint
    assert 'cat.jpg' in result.stdout


def test_a_batch_size_the_processes_cannot_share_is_one_line(cifar_dir, tmp_path):
    result = torchrun('--batch-size', 15, '--data-dir', cifar_dir, cwd=tmp_path, check=False)
    assert result.returncode != 0
    errors = lines_starting(result.stderr, 'error:')
    assert errors == ['error: --batch-size 15 is the global batch and must be shared evenly by the 2 processes: '
                      'give a multiple of 2'], result.stderr
    assert exit_codes(tmp_path) == [2, 2]
    assert not our_tracebacks(result.stderr)
    assert not (tmp_path / 'model').exists() or not list((tmp_path / 'model').glob('*.pth'))


def test_a_nan_loss_stops_every_process_with_one_line(cifar_dir, tmp_path):
    result = torchrun(*FLAGS, '--data-dir', cifar_dir, '--lr', 1e30, cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert len(lines_starting(result.stderr, 'error: training diverged')) == 1, result.stderr
    assert exit_codes(tmp_path) == [2, 2]
    assert not our_tracebacks(result.stderr)


def test_an_unreadable_image_read_by_one_process_is_reported_once(odd_folders, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(odd_folders, data)
    bad = sorted((data / 'train' / 'cat').iterdir())[3]
    bad.write_bytes(b'not an image')
    result = torchrun(*FLAGS, '--data-dir', data, '--loader', 'stream', cwd=tmp_path, check=False)
    assert result.returncode != 0
    errors = lines_starting(result.stderr, 'error:')
    assert len(errors) == 1 and bad.name in errors[0], result.stderr
    assert not our_tracebacks(result.stderr)


# ---------------------------------------------------------------- signals and kill -9

@pytest.fixture(scope='module')
def medium_data(tmp_path_factory) -> Path:
    """3,000 images: about a second an epoch in two processes, long enough to stop one in the middle."""
    return write_cifar10(tmp_path_factory.mktemp('medium'), per_batch=600, test=200)


@pytest.fixture(scope='module')
def uninterrupted(medium_data, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp('ddp-reference')
    torchrun(*SLOW, '--data-dir', medium_data, cwd=work)
    return work / 'model'


def wait_for_line(process, prefix: str) -> None:
    for line in process.stdout:
        if line.startswith(prefix):
            return
    raise AssertionError(f'never printed {prefix!r}: {process.stderr.read()}')


def workers(parent: int) -> list:
    """The processes torchrun started (its children), from /proc."""
    found = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return sorted(found)


@posix_only
def test_sigterm_mid_epoch_saves_once_and_resume_ends_exactly_as_uninterrupted(medium_data, uninterrupted, tmp_path):
    process = start_torchrun(*SLOW, '--data-dir', medium_data, cwd=tmp_path)
    wait_for_line(process, 'epoch   1/2')
    process.send_signal(signal.SIGTERM)  # torchrun passes it on to both processes
    out, err = finish(process, 60)
    assert lines_starting(err, 'interrupted: training state saved in model/last.pth') != [], err
    assert len(lines_starting(err, 'interrupted:')) == 1, err  # rank 0 alone
    assert 'continue with: torchrun --standalone --nproc-per-node=2 train_ddp.py --resume' in err
    assert exit_codes(tmp_path) == [143, 143]
    state = load_weights(tmp_path / 'model' / 'last.pth')
    assert state['resume']['epoch'] == 1 and state['resume']['meter'] is not None  # in the middle of epoch 2
    assert not list((tmp_path / 'model').glob('.*.tmp'))
    torchrun(*SLOW, '--data-dir', medium_data, '--resume', cwd=tmp_path)
    for name in ('model_1.pth', 'last.pth'):
        assert largest_difference(tmp_path / 'model' / name, uninterrupted / name) == 0.0  # exactly


@posix_only
def test_kill_9_of_one_process_ends_the_run_in_seconds_and_resume_works(medium_data, uninterrupted, tmp_path):
    process = start_torchrun(*SLOW, '--data-dir', medium_data, cwd=tmp_path)
    wait_for_line(process, 'epoch   1/2')
    victims = workers(process.pid)
    assert len(victims) == 2
    killed = time.monotonic()
    os.kill(victims[1], signal.SIGKILL)
    out, err = finish(process, 60)
    assert time.monotonic() - killed < 30  # not the collective timeout: the others notice at once
    assert process.returncode != 0
    assert not our_tracebacks(err)
    assert 'stopped: another process of this run failed or was killed' in err
    for path in (tmp_path / 'model').glob('*.pth'):
        weights(path)  # every checkpoint loads
    torchrun(*SLOW, '--data-dir', medium_data, '--resume', cwd=tmp_path)
    assert largest_difference(tmp_path / 'model' / 'model_1.pth', uninterrupted / 'model_1.pth') == 0.0
