"""The three training scripts on small generated data in the real formats: checkpoints, TensorBoard, data."""
import hashlib
import os
import subprocess
import sys
import tarfile
import urllib.request

import pytest
import torch

from conftest import (CLASSES, CPU, SCRIPTS, TRAIN_FLAGS, assert_clean_error, fails_cleanly,
                      load_weights, run_main, run_script, same_weights, scalars, script_env, script_path,
                      write_cifar10, write_image_folders)
from training.data import CIFAR10


@pytest.mark.parametrize('script', SCRIPTS)
def test_training_writes_checkpoints_and_tensorboard(script, runs):
    work, result = runs[script]
    model_dir = work / 'model'
    for name in ('model_0.pth', 'model_1.pth'):  # the tutorial's plain state_dicts, epochs from 0
        state = load_weights(model_dir / name)
        assert list(state) == [f'model.{i}.{p}' for i in (0, 2, 4, 7, 8) for p in ('weight', 'bias')]
    for name in ('best.pth', 'last.pth'):
        bundle = load_weights(model_dir / name)
        assert bundle['classes'] == CLASSES
        assert bundle['config']['batch_size'] == 16 and bundle['config']['script'] == script
    assert load_weights(model_dir / 'last.pth')['epoch'] == 1
    assert not list(model_dir.glob('.*.tmp')), 'temporary files left behind'

    run_dir = work / 'logs' / 'run'
    train_loss = scalars(run_dir, 'train_loss')
    assert [s for s, _ in train_loss] == list(range(5, 2 * 63 + 1, 5))  # 2 epochs x 63 steps, every 5
    assert [s for s, _ in scalars(run_dir, 'test_loss')] == [0, 1]
    accuracy = scalars(run_dir, 'test_accuracy')
    assert [s for s, _ in accuracy] == [0, 1] and all(0 <= v <= 1 for _, v in accuracy)
    # a learnable task: the loss falls and the model beats chance (10%) by far
    assert train_loss[-1][1] < 0.7 * train_loss[0][1], train_loss
    assert accuracy[-1][1] > 0.6, accuracy
    assert 'epoch   2/2' in result.stdout and 'best test accuracy' in result.stdout


def test_same_seed_same_weights_from_all_three_scripts(runs):
    first = runs[SCRIPTS[0]][0] / 'model' / 'model_1.pth'
    on_the_cpu = [s for s in SCRIPTS[1:] if s != 'train_gpu_1.py' or not torch.cuda.is_available()]  # (.cuda())
    for script in on_the_cpu:
        assert same_weights(first, runs[script][0] / 'model' / 'model_1.pth'), script


def test_another_seed_gives_other_weights(runs, cifar_dir, tmp_path):
    run_main('train.py', *TRAIN_FLAGS, '--data-dir', cifar_dir, '--seed', 1, cwd=tmp_path)
    a = load_weights(runs['train.py'][0] / 'model' / 'model_1.pth')
    b = load_weights(tmp_path / 'model' / 'model_1.pth')
    assert not torch.equal(a['model.0.weight'], b['model.0.weight'])


def test_image_folder_dataset_with_its_own_classes(tmp_path):
    data = write_image_folders(tmp_path / 'pets')
    run_main('train_gpu_2.py', '--epochs', 2, '--batch-size', 8, '--lr', 0.02, '--data-dir', data, *CPU,
             cwd=tmp_path)
    bundle = load_weights(tmp_path / 'model' / 'best.pth')
    assert bundle['classes'] == ['cat', 'dog', 'horse']
    assert bundle['model']['model.8.weight'].shape == (3, 64)


def test_dry_run_needs_no_data_and_leaves_nothing_behind(tmp_path):
    result = run_script('train_gpu_2.py', '--dry-run', *CPU, cwd=tmp_path)  # a new process: its scratch is gone
    assert 'dry run OK' in result.stdout and 'FakeData' in result.stdout
    scratch = result.stdout.split('checkpoints: ')[1].split('/model/')[0]
    made = [name for name in ('model', 'logs', 'dataset') if (tmp_path / name).exists()]
    assert made == []  # no model/, logs/ or dataset/ in the project (here: the working folder)
    assert not (tmp_path / scratch).exists()


def test_each_run_logs_to_its_own_folder(tmp_path):
    for _ in range(2):
        run_main('train.py', '--dry-run', '--log-dir', 'logs', cwd=tmp_path)
    runs = sorted(p.name for p in (tmp_path / 'logs').iterdir())
    assert len(runs) == 2 and all('train' in name for name in runs)
    assert all(scalars(tmp_path / 'logs' / name, 'test_accuracy') for name in runs)


def test_offline_download_fails_with_one_clear_line(tmp_path):
    result = run_script('train.py', '--epochs', 1, cwd=tmp_path, check=False)
    line = assert_clean_error(result, 'cifar-10-python.tar.gz', 'cifar-10-batches-py', '--data-dir')
    assert 'Offline?' in line
    assert not (tmp_path / 'dataset' / 'cifar-10-python.tar.gz').exists()  # no partial download left


def test_damaged_archive_is_reported_and_kept(tmp_path, monkeypatch):
    for name, value in (('http_proxy', 'http://127.0.0.1:9'), ('https_proxy', 'http://127.0.0.1:9')):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(urllib.request, '_opener', None)  # urlopen keeps the proxies it saw: forget them after
    (tmp_path / 'dataset').mkdir()
    (tmp_path / 'dataset' / 'cifar-10-python.tar.gz').write_bytes(b'not really a tarball')
    fails_cleanly('train_gpu_2.py', CPU, tmp_path, 'incomplete or damaged')
    assert (tmp_path / 'dataset' / 'cifar-10-python.tar.gz').read_bytes() == b'not really a tarball'


def test_damaged_extracted_batch_is_reported(tmp_path):
    data = write_cifar10(tmp_path / 'data', per_batch=10, test=10)
    batch = data / 'cifar-10-batches-py' / 'data_batch_3'
    batch.write_bytes(batch.read_bytes()[:100])
    fails_cleanly('train.py', ['--data-dir', data], tmp_path, 'damaged', 'cifar-10-batches-py')


@pytest.mark.parametrize('flag, value', [('--epochs', 0), ('--batch-size', -1), ('--lr', 0), ('--lr', 'fast')])
def test_bad_numbers_are_refused(flag, value, tmp_path):
    fails_cleanly('train.py', [flag, value, '--dry-run'], tmp_path, flag)


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message shown without CUDA')
def test_asking_for_cuda_without_cuda_is_a_clear_error(tmp_path):
    fails_cleanly('train_gpu_2.py', ['--device', 'cuda', '--dry-run'], tmp_path, '--device cuda', 'not available')


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU fallback')
def test_train_gpu_1_says_it_falls_back_to_the_cpu(runs):
    assert 'training device: cpu (CUDA is not available' in runs['train_gpu_1.py'][1].stdout


# ---------------------------------------------------------------- what the README promises about flags and output

ONE_EPOCH = ('--epochs', 1, '--batch-size', 16, '--lr', 0.02, '--run-name', 'run')


@pytest.fixture(scope='session')
def fp32_run(cifar_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp('fp32')
    return work, run_main('train_gpu_2.py', *ONE_EPOCH, '--precision', 'fp32', '--data-dir', cifar_dir, *CPU, cwd=work)


@pytest.mark.parametrize('flags, header, exact', [
    (('--precision', 'fp32', '--no-channels-last'), 'fp32)', False),  # other kernels: the same model, rounded
    (('--precision', 'fp32', '--compile'), 'fp32, channels_last, compiled)', False),
    (('--precision', 'fp32', '--no-cudnn-benchmark'), 'fp32, channels_last)', True),  # on the CPU: nothing to tune
    (('--precision', 'bf16',), 'bf16 autocast, channels_last)', None),  # bf16 rounding: another model
])
def test_speed_flags_in_a_real_run(flags, header, exact, fp32_run, cifar_dir, tmp_path):
    """On the CPU, where each run here trains (on a GPU: tests/test_gpu_ready.py)."""
    autotuning = torch.backends.cudnn.benchmark
    result = run_main('train_gpu_2.py', *ONE_EPOCH, *flags, '--data-dir', cifar_dir, *CPU, cwd=tmp_path)
    assert header in result.stdout.splitlines()[2]
    mine, reference = tmp_path / 'model' / 'model_0.pth', fp32_run[0] / 'model' / 'model_0.pth'
    if exact:
        assert same_weights(mine, reference)
    elif exact is False:
        a, b = load_weights(mine), load_weights(reference)
        assert not same_weights(mine, reference)
        assert all(torch.allclose(a[k], b[k], atol=2e-3, rtol=0) for k in a), 'a different model, not rounding'
    else:
        assert not same_weights(mine, reference)
    assert scalars(tmp_path / 'logs' / 'run', 'test_accuracy')[-1][1] > 0.3  # it learned (chance: 0.1)
    config = load_weights(tmp_path / 'model' / 'best.pth')['config']
    assert (config['channels_last'], config['compile'], config['cudnn_benchmark']) == \
        ('--no-channels-last' not in flags, '--compile' in flags, '--no-cudnn-benchmark' not in flags)
    assert torch.backends.cudnn.benchmark == autotuning  # a CPU run leaves cuDNN's settings alone


def test_quiet_prints_only_the_device_and_the_summary(cifar_dir, tmp_path):
    result = run_main('train.py', *ONE_EPOCH, '--quiet', '--data-dir', cifar_dir, cwd=tmp_path)
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0] == 'training device: cpu' and lines[1].startswith('done in ')


def test_a_progress_bar_on_a_terminal_and_none_elsewhere(cifar_dir, tmp_path, runs):
    pty = pytest.importorskip('pty', reason='needs a pseudo-terminal (not on Windows)')
    import fcntl
    import struct
    import termios
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 100, 0, 0))  # 24 x 100, as a window has
    process = subprocess.Popen([sys.executable, str(script_path('train.py', tmp_path)), *map(str, ONE_EPOCH),
                                '--data-dir', str(cifar_dir)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=terminal,
                               env=script_env())
    os.close(terminal)
    shown = b''
    while True:  # read as it comes, so that the bar never waits for us
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closed: the process is done with it
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    assert process.wait(timeout=120) == 0
    shown = shown.decode(errors='replace')
    assert 'epoch 1/1' in shown and 'img/s' in shown and '\r' in shown  # a bar that redraws itself
    assert 'epoch   1/1' in process.stdout.read().decode()  # the epoch's line still goes to stdout
    assert all(runs[script][1].stderr == '' for script in SCRIPTS)  # not a terminal: no bar, no clutter


def test_a_local_cifar_archive_is_unpacked_on_first_use(tmp_path, monkeypatch):
    """dataset/cifar-10-python.tar.gz put there by hand (no network): its checksum is checked, then it is
    unpacked and trained on. The archive here is a small one in the real format, with its own checksum."""
    source = write_cifar10(tmp_path / 'source', per_batch=40, test=40)
    (tmp_path / 'dataset').mkdir()
    archive = tmp_path / 'dataset' / 'cifar-10-python.tar.gz'
    with tarfile.open(archive, 'w:gz') as tar:
        tar.add(source / 'cifar-10-batches-py', arcname='cifar-10-batches-py')
    monkeypatch.setattr(CIFAR10, 'tgz_md5', hashlib.md5(archive.read_bytes()).hexdigest())
    for name in ('http_proxy', 'https_proxy'):  # any attempt to download fails at once
        monkeypatch.setenv(name, 'http://127.0.0.1:9')
    monkeypatch.setattr(urllib.request, '_opener', None)
    result = run_main('train.py', '--epochs', 1, '--batch-size', 20, cwd=tmp_path)
    assert 'CIFAR-10 in dataset/cifar-10-batches-py/: 200 training and 40 test images' in result.stdout
    assert (tmp_path / 'dataset' / 'cifar-10-batches-py' / 'test_batch').is_file() and archive.is_file()
