"""Never lose progress, never crash on bad input: resume, signals, kill -9, divergence, bad files and flags.

Bad-input rows call the scripts' real main() through the same error handler the command line uses
(fast); everything about processes and signals runs the real scripts as subprocesses.
"""
import importlib.util
import os
import random
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.serialization
from PIL import Image

from conftest import (OFFLINE, ROOT, TRAIN_FLAGS, assert_clean_error, load_weights, run_script, write_cifar10,
                      write_image_folders)
from model import MyModel
from training.cli import run
from training.files import _umask


def load_script(name):
    spec = importlib.util.spec_from_file_location(name.replace('.py', '_script'), ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PREDICT, TRAIN = load_script('test.py'), load_script('train.py')


def fails_cleanly(script, argv, capsys, *fragments):
    """main(argv) through the command line's error handler: exit code 2 and one clear line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: script.main([str(a) for a in argv]))
    captured = capsys.readouterr()
    result = subprocess.CompletedProcess(argv, exit_info.value.code, captured.out, captured.err)
    return assert_clean_error(result, *fragments)


def same_weights(a, b):
    a, b = load_weights(a), load_weights(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- resume, signals, kill -9, divergence

def test_resumed_run_ends_bit_identical_and_logs_each_step_once(runs, cifar_dir, tmp_path):
    run_script('train.py', *TRAIN_FLAGS, '--epochs', 1, '--data-dir', cifar_dir, '--run-name', 'r', cwd=tmp_path)
    result = run_script('train.py', *TRAIN_FLAGS, '--data-dir', cifar_dir, '--resume', cwd=tmp_path)
    assert 'resuming model/last.pth at epoch 2' in result.stdout
    assert same_weights(tmp_path / 'model' / 'model_1.pth', runs['train.py'][0] / 'model' / 'model_1.pth')
    from test_training import scalars
    assert [s for s, _ in scalars(tmp_path / 'logs' / 'r', 'train_loss')] == list(range(5, 127, 5))
    assert [s for s, _ in scalars(tmp_path / 'logs' / 'r', 'test_accuracy')] == [0, 1]


SLOW = ('--epochs', 2, '--batch-size', 16, '--lr', 0.01, '--precision', 'fp32', '--log-interval', 50)


@pytest.fixture(scope='module')
def slow_data(tmp_path_factory):
    """10,000 images: a few seconds an epoch, long enough to interrupt a run in the middle."""
    return write_cifar10(tmp_path_factory.mktemp('slow'), per_batch=1800, test=200)


@pytest.fixture(scope='module')
def reference(slow_data, tmp_path_factory):
    work = tmp_path_factory.mktemp('reference')
    run_script('train.py', *SLOW, '--data-dir', slow_data, cwd=work)
    return work / 'model' / 'model_1.pth'


def start_training(data, work, *extra):
    return subprocess.Popen([sys.executable, str(ROOT / 'train.py'), *map(str, SLOW), '--data-dir', str(data),
                             *map(str, extra)], cwd=work, env={**os.environ, **OFFLINE, 'PYTHONUNBUFFERED': '1'},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_training(process):
    """Read stdout until the epoch loop has started."""
    for line in process.stdout:
        if line.startswith('TensorBoard:'):
            return
    raise AssertionError(f'training never started: {process.stderr.read()}')


@pytest.mark.parametrize('signum, code', [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_resumable_checkpoint(signum, code, slow_data, reference, tmp_path):
    process = start_training(slow_data, tmp_path)
    wait_for_training(process)
    time.sleep(1.0)
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert 'interrupted' in err and 'python train.py --resume' in err and 'Traceback' not in err
    state = load_weights(tmp_path / 'model' / 'last.pth')
    assert state['resume']['meter'] is not None, 'expected to stop in the middle of an epoch'
    run_script('train.py', *SLOW, '--data-dir', slow_data, '--resume', cwd=tmp_path)
    assert same_weights(tmp_path / 'model' / 'model_1.pth', reference)


def test_fast_recipe_resumes_bit_identical_after_a_signal(slow_data, tmp_path):
    """The schedule, the momentum buffers, the crops and mirrors and the normalisation all continue exactly."""
    fast = ('--recipe', 'fast', '--crop-padding', 4, '--batch-size', 64, '--lr', 0.02)
    run_script('train.py', *SLOW, *fast, '--data-dir', slow_data, '--checkpoint-dir', tmp_path / 'reference',
               '--log-dir', tmp_path / 'logs', cwd=tmp_path)
    process = start_training(slow_data, tmp_path, *fast)
    wait_for_training(process)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=60)
    assert process.returncode == 130
    assert load_weights(tmp_path / 'model' / 'last.pth')['resume']['meter'] is not None
    run_script('train.py', '--data-dir', slow_data, '--resume', cwd=tmp_path)  # the settings come from last.pth
    resumed, reference = (load_weights(tmp_path / folder / 'model_1.pth') for folder in ('model', 'reference'))
    assert resumed['normalize'] == reference['normalize'] and resumed['config']['crop_padding'] == 4
    assert all(torch.equal(resumed['model'][k], reference['model'][k]) for k in reference['model'])


def test_kill_9_at_random_moments_never_leaves_a_bad_checkpoint(slow_data, reference, tmp_path):
    moments = random.Random(0)
    for attempt in range(3):
        resume = ('--resume',) if (tmp_path / 'model' / 'last.pth').exists() else ()
        process = start_training(slow_data, tmp_path, *resume)
        wait_for_training(process)
        time.sleep(moments.uniform(0.0, 4.0))
        process.kill()
        process.communicate(timeout=30)
        for checkpoint in (tmp_path / 'model').glob('*.pth'):
            load_weights(checkpoint)  # every file the scripts would load is whole
    run_script('train.py', *SLOW, '--data-dir', slow_data, '--resume' if (tmp_path / 'model' / 'last.pth').exists()
               else '--quiet', cwd=tmp_path)
    assert same_weights(tmp_path / 'model' / 'model_1.pth', reference)
    assert not list((tmp_path / 'model').glob('.*.tmp'))


def test_divergence_stops_with_a_clear_message_and_keeps_earlier_checkpoints(trained, cifar_dir, tmp_path):
    model_dir = tmp_path / 'model'
    model_dir.mkdir()
    good = (trained[0] / 'model' / 'model_0.pth').read_bytes()
    (model_dir / 'model_0.pth').write_bytes(good)
    result = run_script('train.py', *TRAIN_FLAGS, '--lr', 1e6, '--data-dir', cifar_dir, cwd=tmp_path, check=False)
    assert_clean_error(result, 'diverged', '--lr')
    assert (model_dir / 'model_0.pth').read_bytes() == good


@pytest.mark.parametrize('limit, failing', [(450_000, 'model_0.pth'), (200_000, 'TensorBoard logs')])
def test_a_full_disk_is_a_clear_error_and_loses_nothing(limit, failing, trained, cifar_dir, tmp_path):
    model_dir = tmp_path / 'model'
    model_dir.mkdir()
    good = (trained[0] / 'model' / 'model_0.pth').read_bytes()
    (model_dir / 'model_0.pth').write_bytes(good)

    def small_disk():  # no file may grow past `limit`: a checkpoint is about 590 kB, an epoch's log 340 kB
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, str(ROOT / 'train.py'), *map(str, TRAIN_FLAGS), '--data-dir',
                             str(cifar_dir), '--epochs', '1'], cwd=tmp_path, preexec_fn=small_disk,
                            capture_output=True, text=True, env={**os.environ, **OFFLINE}, timeout=300)
    assert_clean_error(result, 'cannot write', 'free some space', failing)
    assert (model_dir / 'model_0.pth').read_bytes() == good
    assert sorted(p.name for p in model_dir.iterdir()) == ['model_0.pth']  # no temporary file left


def test_checkpoints_get_the_usual_file_permissions(trained):
    mode = (trained[0] / 'model' / 'model_0.pth').stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask()


def test_an_unwritable_checkpoint_folder_fails_before_training(cifar_dir, tmp_path, capsys):
    blocker = tmp_path / 'not-a-folder'
    blocker.write_text('a file where the folder should be')  # unwritable even for root
    fails_cleanly(TRAIN, ['--data-dir', cifar_dir, '--checkpoint-dir', blocker], capsys,
                  'cannot write checkpoints', 'not-a-folder')


@pytest.mark.skipif(os.geteuid() == 0, reason='root can write into read-only folders')
def test_a_read_only_checkpoint_folder_fails_before_training(cifar_dir, tmp_path, capsys):
    (tmp_path / 'ro').mkdir(mode=0o555)
    fails_cleanly(TRAIN, ['--data-dir', cifar_dir, '--checkpoint-dir', tmp_path / 'ro'], capsys, 'cannot write')


# ---------------------------------------------------------------- the command line

@pytest.mark.parametrize('argv, fragments', [
    (['--epochs', '0'], ['--epochs', 'at least 1']),
    (['--epochs', '-3'], ['--epochs']),
    (['--batch-size', '0'], ['--batch-size']),
    (['--lr', '-0.1'], ['--lr', 'positive']),
    (['--lr', 'nan'], ['--lr']),
    (['--num-workers', '-1'], ['--num-workers']),
    (['--precision', 'fp8'], ['--precision']),
])
def test_bad_flags(argv, fragments, capsys):
    fails_cleanly(TRAIN, argv, capsys, *fragments)


def test_unknown_device(capsys):
    fails_cleanly(load_script('train_gpu_2.py'), ['--device', 'tpu'], capsys, '--device', 'tpu')


def test_resume_with_nothing_to_resume(cifar_dir, tmp_path, capsys):
    fails_cleanly(TRAIN, ['--data-dir', cifar_dir, '--checkpoint-dir', tmp_path / 'empty', '--resume'], capsys,
                  'nothing to resume')
    torch.save(MyModel().state_dict(), tmp_path / 'plain.pth')
    fails_cleanly(TRAIN, ['--data-dir', cifar_dir, '--checkpoint-dir', tmp_path, '--resume', tmp_path / 'plain.pth'],
                  capsys, 'no training state')


def test_resume_on_other_classes_names_them(trained, tmp_path, capsys):
    pets = write_image_folders(tmp_path / 'pets', train=4, test=2)
    fails_cleanly(TRAIN, ['--data-dir', pets, '--checkpoint-dir', trained[0] / 'model', '--resume'], capsys,
                  'other classes', 'airplane', 'cat')


# ---------------------------------------------------------------- data

def test_data_dir_that_does_not_exist(tmp_path, capsys):
    fails_cleanly(TRAIN, ['--data-dir', tmp_path / 'nowhere'], capsys, 'nowhere', 'no such folder')


def test_image_folder_without_test_split(tmp_path, capsys):
    (tmp_path / 'train' / 'cat').mkdir(parents=True)
    fails_cleanly(TRAIN, ['--data-dir', tmp_path], capsys, 'no test/ folder')


def test_different_classes_in_train_and_test(tmp_path, capsys):
    root = write_image_folders(tmp_path / 'd', train=2, test=1)
    (root / 'test' / 'horse').rename(root / 'test' / 'zebra')
    fails_cleanly(TRAIN, ['--data-dir', root], capsys, 'same class folders', "only in train: ['horse']",
                  "only in test: ['zebra']")


def test_empty_class_folder(tmp_path, capsys):
    root = write_image_folders(tmp_path / 'd', train=2, test=1)
    (root / 'train' / 'bird').mkdir()
    fails_cleanly(TRAIN, ['--data-dir', root], capsys, 'bird')


@pytest.mark.parametrize('loader', [['--loader', 'memory'], ['--loader', 'stream', '--num-workers', '1']])
def test_unreadable_image_in_the_data_set_is_named(loader, tmp_path):
    root = write_image_folders(tmp_path / 'd', train=3, test=1)
    (root / 'train' / 'dog' / 'broken.jpg').write_bytes(b'\xff\xd8\xff not really a jpeg')
    result = run_script('train.py', '--data-dir', root, '--epochs', 1, *loader, cwd=tmp_path, check=False)
    assert_clean_error(result, 'broken.jpg', 'unreadable image')


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
def test_unusable_image_paths(make, fragments, tmp_path, checkpoint, capsys):
    fails_cleanly(PREDICT, [make(tmp_path), '--checkpoint', checkpoint], capsys, *fragments)


def test_truncated_image(tmp_path, checkpoint, capsys):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / 'a.png')
    data = (tmp_path / 'a.png').read_bytes()
    (tmp_path / 'a.png').write_bytes(data[:len(data) // 2])
    fails_cleanly(PREDICT, [tmp_path / 'a.png', '--checkpoint', checkpoint], capsys, 'a.png', 'truncated')


def test_decompression_bomb_is_refused(tmp_path, checkpoint, capsys):
    Image.new('1', (20_000, 20_000)).save(tmp_path / 'bomb.png')  # 400 million pixels in a tiny file
    fails_cleanly(PREDICT, [tmp_path / 'bomb.png', '--checkpoint', checkpoint], capsys, 'bomb.png',
                  'decompression bomb')
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's limit is still on


def test_exif_rotated_photo_is_turned_upright(tmp_path, checkpoint, capsys):
    rows, cols = np.mgrid[0:64, 0:40]  # smooth, so that JPEG keeps it; no two orientations look alike
    pixels = np.stack([rows * 4, cols * 6, (rows + cols) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    upright = Image.fromarray(pixels)
    upright.save(tmp_path / 'upright.png')
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / 'sideways.jpg', exif=exif, quality=100)
    tensors = [PREDICT.load_image(tmp_path / name) for name in ('upright.png', 'sideways.jpg')]
    assert tensors[1].shape == (3, 32, 32)
    assert (tensors[0] - tensors[1]).abs().mean() < 0.02  # the same picture, up to JPEG loss
    ignored = PREDICT.PREPROCESS(Image.open(tmp_path / 'sideways.jpg').convert('RGB'))  # EXIF not applied
    assert (tensors[0] - ignored).abs().mean() > 0.1


# ---------------------------------------------------------------- test.py: checkpoints

def test_truncated_checkpoint(checkpoint, capsys):
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[:len(data) // 3])
    fails_cleanly(PREDICT, [ROOT / 'images' / 'dog.png', '--checkpoint', checkpoint], capsys, 'not a readable')


def test_not_a_checkpoint(tmp_path, capsys):
    torch.save({'learning_rate': 0.01}, tmp_path / 'settings.pth')
    fails_cleanly(PREDICT, [ROOT / 'images' / 'dog.png', '--checkpoint', tmp_path / 'settings.pth'], capsys,
                  'not a MyModel checkpoint')
    write_file(tmp_path / 'text.pth', b'just some text')
    fails_cleanly(PREDICT, [ROOT / 'images' / 'dog.png', '--checkpoint', tmp_path / 'text.pth'], capsys,
                  'not a readable')


def test_another_architecture_names_keys_and_shapes(tmp_path, capsys):
    state = MyModel().state_dict()
    state['model.7.weight'] = torch.zeros(128, 1024)
    del state['model.8.bias']
    state['classifier.weight'] = torch.zeros(1)
    torch.save(state, tmp_path / 'other.pth')
    fails_cleanly(PREDICT, [ROOT / 'images' / 'dog.png', '--checkpoint', tmp_path / 'other.pth'], capsys,
                  'missing keys: model.8.bias', 'unexpected keys: classifier.weight', 'model.7.weight [128, 1024]')


class Payload:
    def __reduce__(self):
        return exec, ("open('PWNED', 'w').write('the pickle ran code')",)


def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({'model.0.weight': Payload()}, tmp_path / 'evil.pth')
    assert not (tmp_path / 'PWNED').exists()
    fails_cleanly(PREDICT, [ROOT / 'images' / 'dog.png', '--checkpoint', tmp_path / 'evil.pth'], capsys, 'refused')
    fails_cleanly(TRAIN, ['--resume', tmp_path / 'evil.pth', '--data-dir', tmp_path], capsys, 'refused')  # at parsing
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
