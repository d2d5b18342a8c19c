"""Never lose progress, never crash on bad input: resume, signals, kill -9, divergence, two runs in one
folder, bad files and flags.

Bad-input rows call the scripts' real main() through the same error handler the command line uses
(fast); everything about processes and signals runs the real scripts as subprocesses.
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.serialization
from PIL import Image

from conftest import (ROOT, TRAIN_FLAGS, assert_clean_error, fails_cleanly, load_weights, posix_only, run_main,
                      run_script, same_weights, scalars, script_env, script_module, script_path, start_script,
                      write_image_folders)
from model import MyModel
from training.files import _umask
from training.folders import LOCK_FILE


# ---------------------------------------------------------------- resume, signals, kill -9, divergence

def test_resumed_run_ends_bit_identical_and_logs_each_step_once(runs, cifar_dir, tmp_path):
    run_main('train.py', *TRAIN_FLAGS, '--epochs', 1, '--data-dir', cifar_dir, '--run-name', 'r', cwd=tmp_path)
    result = run_main('train.py', *TRAIN_FLAGS, '--data-dir', cifar_dir, '--resume', cwd=tmp_path)
    assert 'resuming model/last.pth at epoch 2' in result.stdout
    assert same_weights(tmp_path / 'model' / 'model_1.pth', runs['train.py'][0] / 'model' / 'model_1.pth')
    assert [s for s, _ in scalars(tmp_path / 'logs' / 'r', 'train_loss')] == list(range(5, 127, 5))
    assert [s for s, _ in scalars(tmp_path / 'logs' / 'r', 'test_accuracy')] == [0, 1]


SLOW = ('--epochs', 2, '--batch-size', 16, '--lr', 0.01, '--precision', 'fp32', '--log-interval', 50)


@pytest.fixture(scope='session')
def reference(slow_data, tmp_path_factory):
    work = tmp_path_factory.mktemp('reference')
    run_main('train.py', *SLOW, '--data-dir', slow_data, cwd=work)
    return work / 'model' / 'model_1.pth'


def start_training(data, work, *extra):
    return start_script('train.py', *SLOW, '--data-dir', data, *extra, cwd=work)


def wait_for_line(process, prefix: str) -> None:
    """Read the process's output until a line starts with ``prefix``: an event, not a guess at a time."""
    for line in process.stdout:
        if line.startswith(prefix):
            return
    raise AssertionError(f'never printed {prefix!r}: {process.stderr.read()}')


@posix_only
@pytest.mark.parametrize('signum, code', [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_resumable_checkpoint(signum, code, slow_data, reference, tmp_path):
    process = start_training(slow_data, tmp_path)
    wait_for_line(process, 'epoch   1/2')  # epoch 2 has just begun; it takes seconds
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert_clean_error(subprocess.CompletedProcess([], code, out, err), 'interrupted', 'python train.py --resume',
                       code=code)
    state = load_weights(tmp_path / 'model' / 'last.pth')
    assert state['resume']['epoch'] == 1 and state['resume']['meter'] is not None, 'stopped in epoch 2'
    run_main('train.py', *SLOW, '--data-dir', slow_data, '--resume', cwd=tmp_path)
    assert same_weights(tmp_path / 'model' / 'model_1.pth', reference)


FAST = ('--recipe', 'fast', '--crop-padding', 4, '--alternate-flip', '--batch-size', 64, '--lr', 0.02, '--epochs', 2,
        '--precision', 'fp32', '--log-interval', 5)  # 16 steps an epoch on the 1,000 images of cifar_dir


def test_fast_recipe_resumes_bit_identical_after_an_interrupt(cifar_dir, tmp_path, interrupter):
    """The schedule, the momentum buffers, the crops and mirrors and the normalisation all continue exactly."""
    run_main('train.py', *FAST, '--data-dir', cifar_dir, '--checkpoint-dir', 'reference', cwd=tmp_path)
    assert interrupter.run('train.py', *FAST, '--data-dir', cifar_dir, cwd=tmp_path, at=[21]).returncode == 130
    assert load_weights(tmp_path / 'model' / 'last.pth')['resume']['meter']['batches'] == 5  # mid-epoch 2
    run_main('train.py', '--data-dir', cifar_dir, '--resume', cwd=tmp_path)  # the settings come from last.pth
    resumed, reference = (load_weights(tmp_path / folder / 'model_1.pth') for folder in ('model', 'reference'))
    assert resumed['normalize'] == reference['normalize'] and resumed['config']['crop_padding'] == 4
    assert resumed['config']['alternate_flip']  # epoch 2 mirrors exactly the images epoch 1 did not
    assert all(torch.equal(resumed['model'][k], reference['model'][k]) for k in reference['model'])


def test_a_resumed_run_keeps_the_normalisation_its_weights_learned_with(cifar_dir, tmp_path, interrupter):
    assert interrupter.run('train.py', *FAST, '--data-dir', cifar_dir, cwd=tmp_path, at=[3]).returncode == 130
    state = load_weights(tmp_path / 'model' / 'last.pth')
    state['normalize'] = {'mean': [0.25, 0.5, 0.75], 'std': [0.2, 0.3, 0.4]}  # not what the data would give
    torch.save(state, tmp_path / 'model' / 'last.pth')
    run_main('train.py', '--data-dir', cifar_dir, '--resume', cwd=tmp_path)
    for name in ('model_0.pth', 'model_1.pth', 'best.pth', 'last.pth'):
        assert load_weights(tmp_path / 'model' / name)['normalize'] == state['normalize'], name


def test_two_interrupts_in_one_epoch_with_the_stream_loader_lose_nothing(cifar_dir, tmp_path, interrupter):
    """Stopped twice in the same epoch, the streamed run continues where it stopped each time, ends with the
    uninterrupted run's weights and logs every step once, with the same values."""
    flags = (*TRAIN_FLAGS, '--data-dir', cifar_dir, '--loader', 'stream', '--run-name', 'run')
    run_main('train.py', *flags, '--checkpoint-dir', 'reference', '--log-dir', 'reference-logs', cwd=tmp_path)
    first = interrupter.run('train.py', *flags, cwd=tmp_path, at=[22])  # mid-epoch 1 (63 steps) and mid-window
    assert_clean_error(first, 'interrupted', 'step 22', code=130)
    second = interrupter.run('train.py', *flags, '--resume', cwd=tmp_path, at=[14])  # step 36: the same epoch
    assert_clean_error(second, 'step 36', code=130)
    resume = load_weights(tmp_path / 'model' / 'last.pth')['resume']
    assert resume['epoch'] == 0 and resume['meter']['batches'] == 36
    run_main('train.py', *flags, '--resume', cwd=tmp_path)
    assert same_weights(tmp_path / 'model' / 'model_1.pth', tmp_path / 'reference' / 'model_1.pth')
    logged = scalars(tmp_path / 'logs' / 'run', 'train_loss')
    expected = scalars(tmp_path / 'reference-logs' / 'run', 'train_loss')
    assert [step for step, _ in logged] == [step for step, _ in expected] == list(range(5, 127, 5))
    assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6)


def test_a_second_ctrl_c_stops_at_once(cifar_dir, tmp_path, interrupter):
    # Ctrl+C as a terminal has it: a job a script starts in the background begins with Ctrl+C ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = interrupter.run('train.py', *TRAIN_FLAGS, '--data-dir', cifar_dir, cwd=tmp_path, at=[10, 10])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert_clean_error(result, 'interrupted', code=130)  # the first asks for a stop after the step ...
    assert 'saved' not in result.stderr  # ... the second does not wait for it
    assert not (tmp_path / 'model' / 'last.pth').exists()


@posix_only
def test_kill_9_during_and_right_after_checkpoint_writes(cifar_dir, tmp_path):
    """Every epoch writes three checkpoints here; kills land while one is being written (its temporary file is
    there) or right after one was: every .pth still loads, the killed run's lock is gone, and resuming ends
    with the weights of a run never killed."""
    flags = ('--epochs', 8, '--batch-size', 100, '--lr', 0.02, '--precision', 'fp32', '--data-dir', cifar_dir)
    run_main('train.py', *flags, '--checkpoint-dir', 'reference', '--log-dir', 'reference-logs', cwd=tmp_path)
    model_dir, kills, cut_short = tmp_path / 'model', [], 0
    for attempt in range(2):  # a kill during a write, then one right after a write
        resume = ('--resume',) if (model_dir / 'last.pth').exists() else ()
        process = start_script('train.py', *flags, *resume, cwd=tmp_path)
        last_write = (model_dir / 'last.pth').stat().st_mtime_ns if resume else None
        while process.poll() is None:  # as fast as we can look: a checkpoint takes milliseconds to write
            names = os.listdir(model_dir) if model_dir.is_dir() else []
            during = attempt % 2 == 0 and any(name.endswith('.tmp') for name in names)
            after = attempt % 2 == 1 and 'last.pth' in names and \
                (model_dir / 'last.pth').stat().st_mtime_ns != last_write
            if during or after:
                process.kill()
                kills.append('during' if during else 'after')
                break
        assert process.wait(timeout=60) == -signal.SIGKILL, 'the run ended before it was killed'
        cut_short += any(name.endswith('.tmp') for name in os.listdir(model_dir))  # the write never finished
        for checkpoint in model_dir.glob('*.pth'):
            load_weights(checkpoint)  # every file the scripts would load is whole
    run_main('train.py', *flags, '--resume', cwd=tmp_path)  # the killed runs' lock did not survive them
    assert same_weights(model_dir / 'model_7.pth', tmp_path / 'reference' / 'model_7.pth')
    print(f'kills: {kills}; writes cut short: {cut_short}')  # shown with pytest -s
    assert kills == ['during', 'after']


def test_divergence_stops_with_a_clear_message_and_keeps_earlier_checkpoints(trained, cifar_dir, tmp_path):
    model_dir = tmp_path / 'model'
    model_dir.mkdir()
    good = (trained[0] / 'model' / 'model_0.pth').read_bytes()
    (model_dir / 'model_0.pth').write_bytes(good)
    fails_cleanly('train.py', [*TRAIN_FLAGS, '--lr', 1e6, '--data-dir', cifar_dir], tmp_path, 'diverged', '--lr')
    assert (model_dir / 'model_0.pth').read_bytes() == good


@posix_only
@pytest.mark.parametrize('limit, failing', [(450_000, 'model_0.pth'), (200_000, 'TensorBoard logs')])
def test_a_full_disk_is_a_clear_error_and_loses_nothing(limit, failing, trained, cifar_dir, tmp_path):
    import resource  # (POSIX only)
    model_dir = tmp_path / 'model'
    model_dir.mkdir()
    good = (trained[0] / 'model' / 'model_0.pth').read_bytes()
    (model_dir / 'model_0.pth').write_bytes(good)

    def small_disk():  # no file may grow past `limit`: a checkpoint is about 590 kB, an epoch's log 340 kB
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, str(script_path('train.py', tmp_path)), *map(str, TRAIN_FLAGS),
                             '--data-dir', str(cifar_dir), '--epochs', '1'], cwd=tmp_path, preexec_fn=small_disk,
                            capture_output=True, text=True, env=script_env(), timeout=300)
    assert_clean_error(result, 'cannot write', 'free some space', failing)
    assert (model_dir / 'model_0.pth').read_bytes() == good
    left = sorted(p.name for p in model_dir.iterdir() if p.name != LOCK_FILE)  # the lock stays: it is reused
    assert left == ['model_0.pth']  # no temporary file left


def test_a_log_dir_that_cannot_be_made_is_one_clear_line(tmp_path):
    (tmp_path / 'logs').write_text('a file where the TensorBoard folder should be')
    fails_cleanly('train.py', ['--dry-run', '--log-dir', tmp_path / 'logs'], tmp_path, 'cannot write TensorBoard logs',
                  'logs', '--log-dir')


def test_checkpoints_get_the_usual_file_permissions(trained):
    mode = (trained[0] / 'model' / 'model_0.pth').stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask()


def test_an_unwritable_checkpoint_folder_fails_before_training(cifar_dir, tmp_path):
    blocker = tmp_path / 'not-a-folder'
    blocker.write_text('a file where the folder should be')  # unwritable even for root
    fails_cleanly('train.py', ['--data-dir', cifar_dir, '--checkpoint-dir', blocker], tmp_path,
                  'cannot write checkpoints', 'not-a-folder')


@posix_only  # (Windows folders have no such mode bits)
@pytest.mark.skipif(getattr(os, 'geteuid', lambda: 1)() == 0, reason='root can write into read-only folders')
def test_a_read_only_checkpoint_folder_fails_before_training(cifar_dir, tmp_path):
    (tmp_path / 'ro').mkdir(mode=0o555)
    fails_cleanly('train.py', ['--data-dir', cifar_dir, '--checkpoint-dir', tmp_path / 'ro'], tmp_path, 'cannot write')


# ---------------------------------------------------------------- two runs, one folder

def test_two_runs_into_one_checkpoint_folder_the_second_stops_at_once(slow_data, reference, tmp_path):
    """Started in the same moment: one trains, the other stops with one line naming it; nothing is lost."""
    first, second = (start_training(slow_data, tmp_path, '--seed', 0) for _ in range(2))
    outcomes = {}
    while len(outcomes) < 2:  # who gets the folder is a race; the loser must give up while the winner trains
        for process in (first, second):
            if process not in outcomes and process.poll() is not None:
                outcomes[process] = (process.returncode, *process.communicate(), len(outcomes))
        time.sleep(0.05)
    winner, loser = (first, second) if outcomes[first][0] == 0 else (second, first)
    code, out, err, order = outcomes[loser]
    line = assert_clean_error(subprocess.CompletedProcess([], code, out, err),
                              'model/ is in use by another training run',
                              f'pid {winner.pid}', 'train.py', '--checkpoint-dir')
    assert order == 0, 'the second run must stop at once, not after the first one'
    assert outcomes[winner][0] == 0, outcomes[winner][2]
    assert same_weights(tmp_path / 'model' / 'model_1.pth', reference)  # the winner's files are its own
    assert len(list((tmp_path / 'logs').iterdir())) == 1, line  # the loser made no TensorBoard folder


def test_two_runs_started_together_get_a_run_folder_each(tmp_path):
    flags = ('--dry-run', '--log-dir', 'logs', '--run-name', 'same')
    processes = [start_script('train.py', *flags, '--checkpoint-dir', f'model{i}', cwd=tmp_path) for i in range(2)]
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
    assert sorted(p.name for p in (tmp_path / 'logs').iterdir()) == ['same', 'same-2']
    for run in ('same', 'same-2'):  # each holds one run's curve, not two mixed
        assert [s for s, _ in scalars(tmp_path / 'logs' / run, 'test_accuracy')] == [0, 1]


@posix_only  # (a closed pipe is SIGPIPE / EPIPE there)
@pytest.mark.parametrize('script', ['train.py', 'train_gpu_1.py', 'train_gpu_2.py', 'train_ddp.py'])
def test_a_closed_output_pipe_stops_training_quietly(tmp_path, script):
    """`python train.py | head -1` (or a notebook's `!python train.py`): every line is written when printed,
    so head gets its line at once, not a buffer later; then the reader is gone, so the run stops as other
    tools do (not blamed on TensorBoard, no traceback)."""
    device = ['--device', 'cpu'] if script in ('train_gpu_2.py', 'train_ddp.py') else []
    process = subprocess.Popen([sys.executable, str(script_path(script, tmp_path)), '--dry-run', *device], cwd=tmp_path,
                               env=script_env(PYTHONUNBUFFERED=None, CUDA_VISIBLE_DEVICES=''),  # as in a shell
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().startswith('training device: cpu')  # not held back in a buffer
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait(timeout=60) == 141
    assert_clean_error(subprocess.CompletedProcess([], 141, '', err), 'output pipe was closed', code=141)
    assert 'TensorBoard' not in err


# ---------------------------------------------------------------- the command line

@pytest.mark.parametrize('argv, fragments', [
    (['--epochs', '0'], ['--epochs', 'at least 1']),
    (['--epochs', '-3'], ['--epochs']),
    (['--batch-size', '0'], ['--batch-size']),
    (['--lr', '-0.1'], ['--lr', 'positive']),
    (['--lr', 'nan'], ['--lr']),
    (['--num-workers', '-1'], ['--num-workers']),
    (['--precision', 'fp8'], ['--precision']),
    (['--whiten-conv1', '0.3'], ['--whiten-conv1', "Muon's steps", '--muon-lr']),  # the tutorial's SGD
    (['--recipe', 'fast', '--muon-lr', '0', '--whiten-conv1', '0.35'], ['--whiten-conv1', '--muon-lr']),
    (['--whiten-conv1', '-1'], ['--whiten-conv1']),
])
def test_bad_flags(argv, fragments, tmp_path):
    fails_cleanly('train.py', argv, tmp_path, *fragments)


def test_unknown_device(tmp_path):
    fails_cleanly('train_gpu_2.py', ['--device', 'tpu'], tmp_path, '--device', 'tpu')


def test_resume_with_nothing_to_resume(cifar_dir, tmp_path):
    fails_cleanly('train.py', ['--data-dir', cifar_dir, '--checkpoint-dir', tmp_path / 'empty', '--resume'], tmp_path,
                  'nothing to resume')
    torch.save(MyModel().state_dict(), tmp_path / 'plain.pth')
    fails_cleanly('train.py', ['--data-dir', cifar_dir, '--checkpoint-dir', tmp_path, '--resume',
                               tmp_path / 'plain.pth'],
                  tmp_path, 'no training state')


def test_resume_on_other_classes_names_them(trained, tmp_path):
    pets = write_image_folders(tmp_path / 'pets', train=4, test=2)
    fails_cleanly('train.py', ['--data-dir', pets, '--checkpoint-dir', trained[0] / 'model', '--resume'], tmp_path,
                  'other classes', 'airplane', 'cat')


# ---------------------------------------------------------------- data

def test_data_dir_that_does_not_exist(tmp_path):
    fails_cleanly('train.py', ['--data-dir', tmp_path / 'nowhere'], tmp_path, 'nowhere', 'no such folder')


def test_image_folder_without_test_split(tmp_path):
    (tmp_path / 'train' / 'cat').mkdir(parents=True)
    fails_cleanly('train.py', ['--data-dir', tmp_path], tmp_path, 'no test/ folder')


def test_different_classes_in_train_and_test(tmp_path):
    root = write_image_folders(tmp_path / 'd', train=2, test=1)
    (root / 'test' / 'horse').rename(root / 'test' / 'zebra')
    fails_cleanly('train.py', ['--data-dir', root], tmp_path, 'same class folders', "only in train: ['horse']",
                  "only in test: ['zebra']")


def test_empty_class_folder(tmp_path):
    root = write_image_folders(tmp_path / 'd', train=2, test=1)
    (root / 'train' / 'bird').mkdir()
    fails_cleanly('train.py', ['--data-dir', root], tmp_path, 'bird')


@pytest.mark.parametrize('loader', [['--loader', 'memory'], ['--loader', 'stream', '--num-workers', '1']])
def test_unreadable_image_in_the_data_set_is_named(loader, tmp_path):
    root = write_image_folders(tmp_path / 'd', train=3, test=1)
    (root / 'train' / 'dog' / 'broken.jpg').write_bytes(b'\xff\xd8\xff not really a jpeg')
    fails_cleanly('train.py', ['--data-dir', root, '--epochs', 1, *loader], tmp_path, 'broken.jpg', 'unreadable image')


# ---------------------------------------------------------------- test.py: images

@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    torch.save(MyModel().state_dict(), tmp_path / 'weights.pth')
    return tmp_path / 'weights.pth'


def write_file(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize('make, fragments', [
    (lambda d: d / 'missing.png', ['missing.png', 'no such file']),
    (lambda d: (d / 'empty').mkdir() or d / 'empty', ['holds no images']),
    (lambda d: write_file(d / 'notes.txt', b'hello'), ['notes.txt', 'not an image']),
    (lambda d: write_file(d / 'photo.heic', b'\x00\x00\x00\x18ftypheic' + bytes(64)), ['photo.heic', 'HEIC']),
    (lambda d: write_file(d / 'zero.png', b''), ['zero.png', 'not an image']),
])
def test_unusable_image_paths(make, fragments, tmp_path, checkpoint):
    fails_cleanly('test.py', [make(tmp_path), '--checkpoint', checkpoint], tmp_path, *fragments)


def test_truncated_image(tmp_path, checkpoint):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / 'a.png')
    data = (tmp_path / 'a.png').read_bytes()
    (tmp_path / 'a.png').write_bytes(data[:len(data) // 2])
    fails_cleanly('test.py', [tmp_path / 'a.png', '--checkpoint', checkpoint], tmp_path, 'a.png', 'truncated')


@pytest.mark.parametrize('side, pixels', [(10_000, '100,000,000'), (20_000, '400,000,000')])
def test_decompression_bomb_is_refused(side, pixels, tmp_path, checkpoint):
    """Above Pillow's limit Pillow only warns, above twice the limit it refuses: test.py refuses both."""
    Image.new('1', (side, side)).save(tmp_path / 'bomb.png')  # millions of pixels in a tiny file
    fails_cleanly('test.py', [tmp_path / 'bomb.png', '--checkpoint', checkpoint], tmp_path, 'bomb.png',
                  f'refused: {pixels} pixels', f'{Image.MAX_IMAGE_PIXELS:,}', 'decompression bomb')


def test_exif_rotated_photo_is_turned_upright(tmp_path, checkpoint):
    rows, cols = np.mgrid[0:64, 0:40]  # smooth, so that JPEG keeps it; no two orientations look alike
    pixels = np.stack([rows * 4, cols * 6, (rows + cols) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    upright = Image.fromarray(pixels)
    upright.save(tmp_path / 'upright.png')
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / 'sideways.jpg', exif=exif, quality=100)
    tensors = [script_module('test.py').load_image(tmp_path / name) for name in ('upright.png', 'sideways.jpg')]
    assert tensors[1].shape == (3, 32, 32)
    assert (tensors[0] - tensors[1]).abs().mean() < 0.02  # the same picture, up to JPEG loss
    ignored = script_module('test.py').PREPROCESS(Image.open(tmp_path / 'sideways.jpg').convert('RGB'))  # no EXIF
    assert (tensors[0] - ignored).abs().mean() > 0.1


# ---------------------------------------------------------------- test.py: checkpoints

def test_truncated_checkpoint(checkpoint, tmp_path):
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[:len(data) // 3])
    fails_cleanly('test.py', [ROOT / 'images' / 'dog.png', '--checkpoint', checkpoint], tmp_path, 'not a readable')


def test_not_a_checkpoint(tmp_path):
    torch.save({'learning_rate': 0.01}, tmp_path / 'settings.pth')
    fails_cleanly('test.py', [ROOT / 'images' / 'dog.png', '--checkpoint', tmp_path / 'settings.pth'], tmp_path,
                  'not a MyModel checkpoint')
    write_file(tmp_path / 'text.pth', b'just some text')
    fails_cleanly('test.py', [ROOT / 'images' / 'dog.png', '--checkpoint', tmp_path / 'text.pth'], tmp_path,
                  'not a PyTorch checkpoint: it is a text file')
    write_file(tmp_path / 'random.pth', bytes(range(256)) * 4)  # binary, but neither a zip nor a pickle
    fails_cleanly('test.py', [ROOT / 'images' / 'dog.png', '--checkpoint', tmp_path / 'random.pth'], tmp_path,
                  'not a readable')


def test_another_architecture_names_keys_and_shapes(tmp_path):
    state = MyModel().state_dict()
    state['model.7.weight'] = torch.zeros(128, 1024)
    del state['model.8.bias']
    state['classifier.weight'] = torch.zeros(1)
    torch.save(state, tmp_path / 'other.pth')
    fails_cleanly('test.py', [ROOT / 'images' / 'dog.png', '--checkpoint', tmp_path / 'other.pth'], tmp_path,
                  'missing keys: model.8.bias', 'unexpected keys: classifier.weight', 'model.7.weight [128, 1024]')


def test_a_state_dict_without_its_last_layer_is_named_not_a_traceback(tmp_path):
    state = MyModel().state_dict()
    del state['model.8.weight']  # (the layer that says how many classes there are)
    torch.save(state, tmp_path / 'cut.pth')
    line = fails_cleanly('test.py', [ROOT / 'images' / 'dog.png', '--checkpoint', tmp_path / 'cut.pth'], tmp_path,
                         'does not fit MyModel', 'missing keys: model.8.weight')
    assert 'shapes differ' not in line  # its 10 biases: the 10 classes of a plain state_dict


class Payload:
    def __reduce__(self):
        return exec, ("open('PWNED', 'w').write('the pickle ran code')",)


def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({'model.0.weight': Payload()}, tmp_path / 'evil.pth')
    assert not (tmp_path / 'PWNED').exists()
    fails_cleanly('test.py', [ROOT / 'images' / 'dog.png', '--checkpoint', tmp_path / 'evil.pth'], tmp_path, 'refused')
    fails_cleanly('train.py', ['--resume', tmp_path / 'evil.pth', '--data-dir', tmp_path], tmp_path,
                  'refused')  # when the settings are resolved
    assert not (tmp_path / 'PWNED').exists()


def test_a_checkpoint_saved_on_cuda_loads_on_the_cpu(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:  # what torch.save records for tensors that live on a GPU
        patch.setattr(torch.serialization, 'location_tag', lambda storage: 'cuda:0')
        torch.save(MyModel().state_dict(), tmp_path / 'gpu.pth')
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match='CUDA'):
            torch.load(tmp_path / 'gpu.pth', weights_only=True)  # what the tutorial's code would hit
    result = run_script('test.py', ROOT / 'images' / 'dog.png', '--checkpoint', tmp_path / 'gpu.pth',
                        '--device', 'cpu', cwd=tmp_path)
    assert 'images/dog.png' in result.stdout
