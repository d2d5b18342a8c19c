"""The learner's own computer -- Windows with an NVIDIA GPU, a Mac, a notebook -- with each trait the project
depends on reproduced here on Linux: a CPU-only PyTorch beside an NVIDIA card (a stand-in nvidia-smi), console
encodings, a file held open by another program, no fcntl or os.fchmod, DataLoader workers started by spawn and
hit by Ctrl+C, a script started from another folder, a notebook's sys.argv and stdout, a slow or lying network,
MPS's limits, the files a Mac or a browser leaves in picture folders, Chinese class names with and without a
font that draws them, no NCCL, no C++ compiler.
"""
import http.server
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import types
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFont

import training.platforms as platforms
from conftest import (ROOT, assert_clean_error, load_weights, posix_only, project_copy, run_main, run_script,
                      same_weights, script_env, write_cifar10, write_image_folders)
from training import data as data_module
from training import device as device_module
from training import fonts
from training.cli import run
from training.paths import quoted

DATA = Path(__file__).parent / 'data'
ONE_EPOCH = ('--epochs', 1, '--batch-size', 50, '--precision', 'fp32', '--log-interval', 5)


# ---------------------------------------------------------------- a CPU-only PyTorch beside an NVIDIA GPU

@pytest.fixture
def cpu_only_build_beside_a_gpu(tmp_path, monkeypatch):
    """What `pip install torch` gives on Windows -- a PyTorch without CUDA -- on a machine whose NVIDIA driver
    answers: a stand-in nvidia-smi (the real one's table, from a Windows laptop) first on the PATH."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    smi = bin_dir / 'nvidia-smi'
    smi.write_text(f'#!/bin/sh\ncat "{DATA / "nvidia-smi-windows.txt"}"\n')
    smi.chmod(0o755)
    monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
    monkeypatch.setattr(torch.version, 'cuda', None)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    platforms.nvidia_gpu.cache_clear()
    yield
    platforms.nvidia_gpu.cache_clear()


INSTALL = 'python -m pip install --force-reinstall torch torchvision --index-url https://download.pytorch.org/whl/cu126'


@posix_only  # (the stand-in nvidia-smi is a shell script)
def test_a_cpu_only_build_beside_an_nvidia_gpu_is_named_with_its_fix(cpu_only_build_beside_a_gpu, tmp_path):
    out = run_main('train_gpu_2.py', '--dry-run', cwd=tmp_path).stdout
    device_line = out.splitlines()[0]
    assert device_line.startswith('training device: cpu -- not the GPU: this PyTorch')
    for fragment in ('CPU-only build', 'NVIDIA GeForce RTX 3060', 'driver 551.86', 'CUDA 12.4',
                     'update the NVIDIA driver first', INSTALL):
        assert fragment in device_line, fragment
    assert '问题 1：当前安装的 PyTorch' in out and '只能用 CPU 的版本' in out  # the setup check, in Chinese too
    assert 'dry run OK' in out and 'the setup check found 1 problem(s) to fix first' in out  # not a plain OK

    gpu_1 = run_main('train_gpu_1.py', '--dry-run', cwd=tmp_path).stdout.splitlines()[0]
    assert gpu_1.startswith('training device: cpu (CUDA is not available: this PyTorch') and INSTALL in gpu_1
    line = assert_clean_error(run_main('train_gpu_2.py', '--dry-run', '--device', 'cuda', cwd=tmp_path, check=False),
                              '--device cuda', 'CPU-only build', 'NVIDIA GeForce RTX 3060')
    assert INSTALL in line


def test_the_driver_picks_the_cuda_build_to_install(monkeypatch):
    monkeypatch.setattr(torch.version, 'cuda', None)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    for driver_cuda, build in [((13, 0), 'cu130'), ((12, 9), 'cu128'), ((12, 6), 'cu126'), ((12, 4), 'cu126')]:
        gpu = {'names': ['NVIDIA GeForce RTX 4070'], 'driver': '581.0', 'cuda': driver_cuda}
        monkeypatch.setattr(device_module, 'nvidia_gpu', lambda: gpu)
        text = device_module.unusable_gpu()
        assert text.endswith(f'--index-url https://download.pytorch.org/whl/{build}'), text
        assert ('update the NVIDIA driver first' in text) == (driver_cuda < (12, 6))
    monkeypatch.setattr(device_module, 'nvidia_gpu', lambda: None)  # no NVIDIA GPU: nothing to say
    assert device_module.unusable_gpu() is None and device_module.device_note(torch.device('cpu')) == ''


def test_nvidia_smi_is_read_on_windows_and_linux():
    windows = platforms.parse_nvidia_smi((DATA / 'nvidia-smi-windows.txt').read_text())
    assert windows == {'names': ['NVIDIA GeForce RTX 3060'], 'driver': '551.86', 'cuda': (12, 4)}
    linux = platforms.parse_nvidia_smi((DATA / 'nvidia-smi-linux.txt').read_text())
    assert linux == {'names': ['NVIDIA H200', 'NVIDIA H200'], 'driver': '580.65.06', 'cuda': (13, 0)}
    assert platforms.parse_nvidia_smi('NVIDIA-SMI has failed because it could not communicate with the driver') is None


# ---------------------------------------------------------------- the setup check

def test_the_setup_check_says_what_a_learner_would_ask_and_each_problem_with_its_fix(tmp_path):
    (tmp_path / 'model').write_text('a file where the checkpoint folder should be')
    out = run_main('train.py', '--dry-run', cwd=tmp_path).stdout
    report = out[out.index('setup check'):out.index('\ndata: ')]
    for name in ('Python', 'PyTorch', 'NVIDIA GPU', 'Apple GPU', 'training on', 'precision', 'CIFAR-10', 'folders',
                 'console'):
        assert re.search(rf'^  {name} +\S', report, flags=re.MULTILINE), name
    assert f'{torch.__version__}, CUDA {torch.version.cuda} build' in report or 'CPU-only build' in report
    assert 'not in dataset/ yet: the first run downloads it (163 MB' in report  # where the scripts look
    assert 'problem 1: model/ cannot be written (a file of that name is in the way)' in report
    assert '问题 1：model/ 无法写入' in report
    assert 'the setup check found 1 problem(s)' in out


# ---------------------------------------------------------------- console encodings

@pytest.fixture(scope='session')
def checkpoint_and_pictures(tmp_path_factory):
    """A 10-class checkpoint and a folder of pictures whose names a cp1252 or GBK console cannot all show."""
    work = tmp_path_factory.mktemp('encodings')
    torch.manual_seed(0)
    from model import MyModel
    torch.save(MyModel().state_dict(), work / 'model.pth')
    pictures = work / '照片 😀'
    pictures.mkdir()
    for name in ('猫.png', '강아지.png', 'cat.png'):
        shutil.copy(ROOT / 'images' / 'dog.png', pictures / name)
    return work


@pytest.mark.parametrize('encoding', ['ascii', 'gbk'])  # (cp1252: the training run below)
def test_no_console_encoding_stops_a_result(encoding, checkpoint_and_pictures, tmp_path):
    work, env = checkpoint_and_pictures, {'PYTHONIOENCODING': encoding}
    args = (work / '照片 😀', '--checkpoint', work / 'model.pth')
    result = run_script('test.py', *args, cwd=tmp_path, env=env, text=False)
    text = result.stdout.decode(encoding)  # what the console shows
    assert text.count('.png: ') == 3 and 'Traceback' not in result.stderr.decode(encoding, 'replace')
    for name, shown in (('猫', '猫' if encoding == 'gbk' else '\\u732b'), ('강아지', '\\uac15\\uc544\\uc9c0')):
        assert f'{shown}.png' in text, (name, text)  # never lost: the character, or its escape
    shown_json = run_script('test.py', *args, '--json', cwd=tmp_path, env=env, text=False).stdout
    document = json.loads(shown_json.decode(encoding))
    assert sorted(Path(p['image']).name for p in document['predictions']) == ['cat.png', '猫.png', '강아지.png']
    assert document['predictions'][0]['top'][0]['chinese'] in data_module.CHINESE_NAMES.values()

    if encoding == 'ascii':  # and an error line that names such a file
        missing = run_script('test.py', work / '没有 😀.png', '--checkpoint', work / 'model.pth', cwd=tmp_path,
                             env=env, check=False, text=False)
        line = assert_clean_error(subprocess.CompletedProcess([], missing.returncode, '',
                                                              missing.stderr.decode(encoding)), 'no such file')
        assert '\\u6ca1\\u6709 \\U0001f600.png' in line


def test_a_training_run_into_a_folder_the_console_cannot_name(cifar_dir, tmp_path):
    data = tmp_path / '数据 😀'
    shutil.copytree(cifar_dir, data)
    result = run_script('train.py', *ONE_EPOCH, '--data-dir', data.name, cwd=tmp_path,
                        env={'PYTHONIOENCODING': 'cp1252'}, text=False)
    assert 'CIFAR-10 in \\u6570\\u636e \\U0001f600/cifar-10-batches-py/' in result.stdout.decode('cp1252')


# ---------------------------------------------------------------- Windows file semantics

@pytest.fixture
def refused_replacements(monkeypatch):
    """os.replace refusing to replace ``name`` ``times`` times, as Windows does while another program holds the
    file open (Access is denied); the project's patience shortened to a fifth of a second."""
    refusals = {}
    real_replace = os.replace

    def replace(source, target):
        name = Path(target).name
        if refusals.get(name, 0) > 0:
            refusals[name] -= 1
            raise PermissionError(13, 'Access is denied')
        real_replace(source, target)
    monkeypatch.setattr(os, 'replace', replace)
    monkeypatch.setattr(platforms, 'REPLACE_PATIENCE', 0.2)
    return refusals


TWO_EPOCHS = ('--epochs', 2, '--batch-size', 16, '--lr', 0.02, '--log-interval', 5, '--precision', 'fp32')


def test_a_checkpoint_held_open_for_a_moment_is_written_once_it_is_free(runs, cifar_dir, tmp_path,
                                                                      refused_replacements):
    refused_replacements.update({'best.pth': 3, 'last.pth': 2, 'model_1.pth': 4})
    run_main('train.py', *TWO_EPOCHS, '--data-dir', cifar_dir, cwd=tmp_path)
    assert same_weights(tmp_path / 'model' / 'model_1.pth', runs['train.py'][0] / 'model' / 'model_1.pth')
    assert not list((tmp_path / 'model').glob('.*.tmp')) and sum(refused_replacements.values()) == 0


def test_a_checkpoint_held_open_for_good_is_named_and_nothing_is_lost(runs, cifar_dir, tmp_path,
                                                                      refused_replacements):
    refused_replacements['best.pth'] = 1  # epoch 1's best.pth is written; epoch 2's is refused for good
    run_main('train.py', *TWO_EPOCHS, '--epochs', 1, '--data-dir', cifar_dir, cwd=tmp_path)
    refused_replacements['best.pth'] = 10 ** 6
    result = run_main('train.py', *TWO_EPOCHS, '--data-dir', cifar_dir, '--resume', cwd=tmp_path, check=False)
    line = assert_clean_error(result, 'cannot replace model/best.pth', 'another program is using it',
                              'continue with: python train.py --resume', '(model/last.pth is complete)')
    assert 'free some space' not in line
    assert load_weights(tmp_path / 'model' / 'last.pth')['resume'] == {'epoch': 1, 'meter': None}  # epoch 1's
    assert not list((tmp_path / 'model').glob('.*.tmp'))
    refused_replacements['best.pth'] = 0  # the other program let go
    run_main('train.py', *TWO_EPOCHS, '--data-dir', cifar_dir, '--resume', cwd=tmp_path)  # as the line says
    for name in ('model_1.pth', 'best.pth', 'last.pth'):
        assert same_weights(tmp_path / 'model' / name, runs['train.py'][0] / 'model' / name), name


LOCK_HOLDER = '''
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import training.platforms as platforms
from training.folders import take_lock
from training.files import atomic_write, one_at_a_time
assert platforms.fcntl is None, 'the msvcrt path'
atomic_write(b'written without os.fchmod', Path(sys.argv[2]) / 'file.txt')
lock = take_lock(Path(sys.argv[2]) / '.training.lock', 'the first run')
with one_at_a_time(Path(sys.argv[2]) / '.data.lock'):
    print('holding', flush=True)
    sys.stdin.readline()  # until told to let go
'''
LOCK_TAKER = '''
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from training.errors import UserError
from training.folders import take_lock
from training.files import one_at_a_time
try:
    take_lock(Path(sys.argv[2]) / '.training.lock', 'the second run')
except UserError as e:
    print(e, flush=True)
start = time.monotonic()
with one_at_a_time(Path(sys.argv[2]) / '.data.lock'):
    print(f'waited {time.monotonic() - start:.1f}s', flush=True)
'''


@posix_only  # (the msvcrt stand-in is built on POSIX record locks)
def test_without_fcntl_and_fchmod_files_lock_and_save_as_on_windows(tmp_path):
    launch = [sys.executable, str(ROOT / 'tests' / 'launch.py'), '--windows-files']
    for name, code in (('holder.py', LOCK_HOLDER), ('taker.py', LOCK_TAKER)):
        (tmp_path / name).write_text(code)
    holder = subprocess.Popen([*launch, str(tmp_path / 'holder.py'), str(ROOT), str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=script_env())
    assert holder.stdout.readline() == 'holding\n'
    taker = subprocess.Popen([*launch, str(tmp_path / 'taker.py'), str(ROOT), str(tmp_path)], stdout=subprocess.PIPE,
                             text=True, env=script_env())
    refused = taker.stdout.readline()
    assert 'is in use by another training run (the first run)' in refused  # at once, naming the holder
    time.sleep(1.2)  # the taker waits for the data lock meanwhile (msvcrt retries every second)
    holder.communicate('go\n', timeout=30)
    waited = float(taker.communicate(timeout=30)[0].split()[1][:-1])
    assert waited >= 1.0 and taker.returncode == 0
    assert (tmp_path / 'file.txt').read_bytes() == b'written without os.fchmod'
    # and a whole dry run through the scripts' own lock and checkpoint writes
    dry = subprocess.run([*launch, str(ROOT / 'train.py'), '--dry-run', '--checkpoint-dir', tmp_path / 'model'],
                         capture_output=True, text=True, env=script_env(), timeout=120)
    assert dry.returncode == 0 and 'dry run OK' in dry.stdout, dry.stderr
    assert sorted(p.name for p in (tmp_path / 'model').glob('*.pth')) == ['best.pth', 'last.pth', 'model_0.pth',
                                                                          'model_1.pth']


# ---------------------------------------------------------------- Ctrl+C with DataLoader workers

@pytest.fixture(scope='session')
def picture_folders(tmp_path_factory):
    return write_image_folders(tmp_path_factory.mktemp('pictures'), train=100, test=10)


@posix_only  # (Ctrl+C to a whole process group; spawn itself is what Windows and macOS use)
@pytest.mark.parametrize('start_method', ['fork', 'spawn'])
def test_ctrl_c_with_dataloader_workers_saves_and_no_worker_says_a_word(start_method, picture_folders, tmp_path):
    """A terminal's Ctrl+C reaches every process of the job: the workers ignore it, the main process saves."""
    script = project_copy(tmp_path) / 'train.py'
    flags = ('--epochs', 3, '--batch-size', 4, '--loader', 'stream', '--num-workers', 2, '--data-dir', picture_folders)
    process = subprocess.Popen([sys.executable, str(ROOT / 'tests' / 'launch.py'), '--start-method', start_method,
                                str(script), *map(str, flags)], cwd=tmp_path, env=script_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal
    for line in process.stdout:
        if line.startswith('epoch   1/3'):  # epoch 2 is under way, the workers busy
            break
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert_clean_error(subprocess.CompletedProcess([], process.returncode, out, err), 'interrupted',
                       'continue with: python train.py --resume', code=130)
    assert load_weights(tmp_path / 'model' / 'last.pth')['resume']['meter'] is not None  # saved mid-epoch


# ---------------------------------------------------------------- started from another folder

def test_started_from_another_folder_it_uses_the_projects_own_folders(cifar_dir, tmp_path):
    project = project_copy(tmp_path / '我的 项目')
    shutil.copytree(cifar_dir / 'cifar-10-batches-py', project / 'dataset' / 'cifar-10-batches-py')
    train = subprocess.run([sys.executable, '我的 项目/train.py', *map(str, ONE_EPOCH)], cwd=tmp_path,
                           env=script_env(), capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr
    assert "CIFAR-10 in '我的 项目/dataset/cifar-10-batches-py/'" not in train.stdout  # (paths are printed plainly)
    assert 'CIFAR-10 in 我的 项目/dataset/cifar-10-batches-py/' in train.stdout
    assert (project / 'model' / 'model_0.pth').is_file() and not (tmp_path / 'model').exists()
    tensorboard = shlex.split(train.stdout.split('TensorBoard: ')[-1].split(' (this run')[0])
    assert tensorboard[:2] == ['tensorboard', '--logdir'] and (tmp_path / tensorboard[2]).resolve() == project / 'logs'
    classify = subprocess.run([sys.executable, str(project / 'test.py')], cwd=tmp_path, env=script_env(),
                              capture_output=True, text=True, timeout=120)
    assert classify.returncode == 0, classify.stderr  # the project's images/dog.png, its newest checkpoint
    assert 'checkpoint: 我的 项目/model/last.pth' in classify.stdout and '我的 项目/images/dog.png: ' in classify.stdout


def test_a_printed_resume_command_works_when_pasted(cifar_dir, runs, tmp_path, interrupter):
    project = project_copy(tmp_path / 'my project')
    shutil.copytree(cifar_dir, tmp_path / 'my data')
    flags = (*TWO_EPOCHS, '--data-dir', 'my data', '--checkpoint-dir', 'my runs')
    result = interrupter.run('train.py', *flags, cwd=tmp_path, project=project, at=[40])
    hint = assert_clean_error(result, 'interrupted', code=130).split('continue with: ')[1]
    assert hint == "python 'my project/train.py' --resume --checkpoint-dir 'my runs' --data-dir 'my data'"
    pasted = shlex.split(hint)  # as a shell reads it
    resumed = subprocess.run([sys.executable, *pasted[1:]], cwd=tmp_path, env=script_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert same_weights(tmp_path / 'my runs' / 'model_1.pth', runs['train.py'][0] / 'model' / 'model_1.pth')
    assert not (tmp_path / 'my runs' / 'model_2.pth').exists()  # the run's own 2 epochs, not train.py's 10


def test_commands_are_quoted_for_the_learners_shell():
    assert quoted('model') == 'model' and quoted('项目/train.py') == '项目/train.py'
    assert quoted('my runs') == "'my runs'" and quoted("it's") == "'it'\"'\"'s'"
    assert shlex.split(quoted("a 'b' c")) == ["a 'b' c"]
    assert quoted(r'D:\学习\pytorch 教程\model', windows=True) == r'"D:\学习\pytorch 教程\model"'
    assert quoted(r'D:\学习\model', windows=True) == r'D:\学习\model'
    assert quoted('a&b', windows=True) == '"a&b"'


# ---------------------------------------------------------------- notebooks

def kernel_argv(monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['/usr/local/lib/python3.12/dist-packages/colab_kernel_launcher.py', '-f',
                                      '/root/.local/share/jupyter/runtime/kernel-5c2f0a3d-7b8e.json'])


def test_main_called_from_a_notebook_cell_ignores_the_kernels_arguments(cifar_dir, tmp_path, monkeypatch):
    from conftest import project_at, script_module, working_directory
    shutil.copytree(cifar_dir / 'cifar-10-batches-py', tmp_path / 'dataset' / 'cifar-10-batches-py')
    kernel_argv(monkeypatch)
    with working_directory(tmp_path), project_at(tmp_path):
        progress = script_module('train.py').main()  # as a cell calls it: the tutorial's 10 epochs
        assert progress.epoch == 10 and (tmp_path / 'model' / 'model_9.pth').is_file()
        script_module('train.py').main(['--epochs', '11', '--resume'])  # flags, as a list
    assert load_weights(tmp_path / 'model' / 'last.pth')['resume']['epoch'] == 11
    monkeypatch.setattr(sys, 'argv', ['train.py', '--epochs', '2'])  # %run train.py --epochs 2 is a command line
    assert platforms.script_arguments() == ['--epochs', '2']


@pytest.fixture
def notebook(monkeypatch):
    """A Jupyter kernel as the project sees one: IPython's get_ipython() gives a shell with a kernel, and
    stdout is the kernel's stream (no file descriptor, no reconfigure)."""
    shell = types.SimpleNamespace(kernel=object())
    monkeypatch.setitem(sys.modules, 'IPython', types.SimpleNamespace(get_ipython=lambda: shell))
    kernel_argv(monkeypatch)


class KernelStream(io.StringIO):
    encoding = 'utf-8'

    def fileno(self):
        raise io.UnsupportedOperation('fileno')


@pytest.mark.skipif(importlib.util.find_spec('ipywidgets') is not None, reason='checks the bar without ipywidgets')
def test_a_notebook_gets_a_progress_bar(notebook, cifar_dir, tmp_path, monkeypatch):
    """Without ipywidgets, tqdm's text bar in the cell's output (stdout), which notebooks redraw in place."""
    from conftest import project_at, script_module, working_directory
    out = KernelStream()
    monkeypatch.setattr(sys, 'stdout', out)
    with working_directory(tmp_path), project_at(tmp_path):
        script_module('train.py').main([*map(str, ONE_EPOCH), '--data-dir', str(cifar_dir)])
    shown = out.getvalue()
    assert 'epoch 1/1' in shown and 'img/s' in shown and '\r' in shown, shown  # a bar, in the cell's output
    assert 'epoch   1/1  train loss' in shown


def test_a_closed_output_in_a_notebook_is_a_line_not_a_second_error(notebook, monkeypatch, capsys):
    monkeypatch.setattr(sys, 'stdout', KernelStream())

    def main():
        raise BrokenPipeError
    with pytest.raises(SystemExit) as stopped:
        run(main)
    assert stopped.value.code == 141 and 'output pipe was closed' in capsys.readouterr().err


# ---------------------------------------------------------------- the download

class Server:
    """A local web server that serves ``payload`` as CIFAR-10's archive, stalling after ``stall_after`` bytes."""

    def __init__(self, payload: bytes, stall_after: int = None):
        served = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header('Content-Length', str(len(payload)))
                self.end_headers()
                cut = len(payload) if served.stall_after is None else served.stall_after
                self.wfile.write(payload[:cut])
                self.wfile.flush()
                if cut < len(payload):
                    served.release.wait(10)  # no more bytes, connection open
                else:
                    served.requests += 1

            def log_message(self, *args):
                pass

        self.stall_after, self.requests, self.release = stall_after, 0, threading.Event()
        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f'http://127.0.0.1:{self.httpd.server_port}/cifar-10-python.tar.gz'

    def close(self):
        self.release.set()
        self.httpd.shutdown()


@pytest.fixture
def archive(tmp_path):
    """A small CIFAR-10 archive in the real format (its own checksum)."""
    source = write_cifar10(tmp_path / 'source', per_batch=20, test=20)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w:gz') as tar:
        tar.add(source / 'cifar-10-batches-py', arcname='cifar-10-batches-py')
    return buffer.getvalue()


def serve(monkeypatch, payload: bytes, md5: str, stall_after=None) -> Server:
    import hashlib
    server = Server(payload, stall_after)
    monkeypatch.setattr(data_module.CIFAR10, 'url', server.url)
    monkeypatch.setattr(data_module.CIFAR10, 'tgz_md5', md5 or hashlib.md5(payload).hexdigest())
    for name in ('http_proxy', 'https_proxy', 'HTTP_PROXY', 'HTTPS_PROXY'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(urllib.request, '_opener', None)
    return server


def test_the_download_says_what_it_fetches_then_checks_it(archive, tmp_path, monkeypatch):
    server = serve(monkeypatch, archive, None)
    try:
        result = run_main('train.py', '--epochs', 1, '--batch-size', 20, '--quiet', cwd=tmp_path)
    finally:
        server.close()
    first = result.stdout.splitlines()[1]  # (after the device)
    assert first == (f'downloading CIFAR-10: cifar-10-python.tar.gz (163 MB) from {server.url} into dataset/ '
                     f'(given up after 30s without data)')
    assert server.requests == 1 and (tmp_path / 'dataset' / 'cifar-10-python.tar.gz').read_bytes() == archive
    assert [p.name for p in (tmp_path / 'dataset').iterdir() if p.name.endswith('.part')] == []
    assert (tmp_path / 'dataset' / 'cifar-10-batches-py' / 'data_batch_5').is_file()


def test_a_download_that_is_not_cifar_10_is_refused_before_it_is_unpacked(archive, tmp_path, monkeypatch):
    server = serve(monkeypatch, archive, md5='0' * 32)  # a captive portal's page would do the same
    try:
        result = run_main('train.py', '--epochs', 1, cwd=tmp_path, check=False)
    finally:
        server.close()
    assert_clean_error(result, 'downloading it failed', 'MD5 checksum', 'Offline?')
    assert sorted(p.name for p in (tmp_path / 'dataset').iterdir()) == ['.download.lock']  # nothing kept


def test_a_stalled_download_gives_up(archive, tmp_path, monkeypatch):
    server = serve(monkeypatch, archive, None, stall_after=1000)
    monkeypatch.setattr(data_module, 'STALL_SECONDS', 0.5)
    start = time.monotonic()
    try:
        result = run_main('train.py', '--epochs', 1, cwd=tmp_path, check=False)
    finally:
        server.close()
    assert_clean_error(result, 'no data arrived for 0.5s', 'Offline?')
    assert time.monotonic() - start < 10
    assert not (tmp_path / 'dataset' / 'cifar-10-python.tar.gz').exists()


# ---------------------------------------------------------------- macOS, browsers, and picture folders

class MpsCounting(torch.utils._python_dispatch.TorchDispatchMode):
    """What Apple GPUs refuse in PyTorch 2.6 - 2.8: index_add_ into int64 (the test then runs on the CPU)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.index_add_.default and args[0].dtype == torch.int64:
            raise RuntimeError('MPS: index_add_(): int64 is not supported')  # (as MPS words it, roughly)
        return func(*args, **(kwargs or {}))


def test_the_confusion_matrix_counts_as_an_apple_gpu_can(runs, cifar_dir, tmp_path):
    best = runs['train.py'][0] / 'model' / 'best.pth'
    with MpsCounting():
        result = run_main('test.py', '--eval', '--checkpoint', best, '--data-dir', cifar_dir, '--json',
                          '--device', 'cpu', cwd=tmp_path)  # (where training evaluated)
    report = json.loads(result.stdout)
    assert sum(map(sum, report['confusion'])) == report['images'] == 200
    assert report['accuracy'] == load_weights(best)['test_accuracy']  # the same counts as training's


def test_jfif_pictures_count_and_a_macs_hidden_files_do_not(tmp_path):
    data = write_image_folders(tmp_path / 'pets', train=8, test=4)
    for folder in (data / 'train' / 'cat', data / 'test' / 'cat'):
        for i, jpg in enumerate(sorted(folder.glob('*.jpg'))):
            jpg.rename(folder / f'saved from a browser {i}.jfif')
        (folder / '._0000.png').write_bytes(b'\x00\x05\x16\x07 AppleDouble')  # what a Mac leaves on a USB stick
        (folder / '.DS_Store').write_bytes(b'\x00\x00\x00\x01Bud1')
    (data / 'train' / '.ipynb_checkpoints').mkdir()  # what Jupyter leaves
    (data / 'test' / '.ipynb_checkpoints').mkdir()
    (data / 'train' / '__MACOSX').mkdir()  # what a Mac's zip leaves
    (data / 'test' / '__MACOSX').mkdir()
    result = run_main('train.py', '--epochs', 1, '--batch-size', 8, '--data-dir', data, cwd=tmp_path)
    assert '24 training and 12 test images, 3 classes' in result.stdout  # .jfif in, the hidden ones out
    assert load_weights(tmp_path / 'model' / 'best.pth')['classes'] == ['cat', 'dog', 'horse']
    pictures = data / 'test' / 'cat'
    shown = run_main('test.py', pictures, '--checkpoint', tmp_path / 'model' / 'best.pth', cwd=tmp_path).stdout
    assert shown.count('.jfif: ') >= 1 and '._0000' not in shown and 'DS_Store' not in shown


# ---------------------------------------------------------------- Chinese class names

@pytest.fixture(scope='session')
def chinese_classes(tmp_path_factory):
    return write_image_folders(tmp_path_factory.mktemp('chinese'), classes=('猫', '狗', '马'), train=6, test=3)


@pytest.fixture
def fonts_found_again():
    """The fonts looked for again before and after the test (after its monkeypatch is undone)."""
    fonts.cjk_font_path.cache_clear(), fonts.font.cache_clear()
    yield
    fonts.cjk_font_path.cache_clear(), fonts.font.cache_clear()


def test_chinese_class_names_never_crash_the_old_pillow_font(chinese_classes, tmp_path, fonts_found_again,
                                                             monkeypatch):
    """Pillow before 10.1: load_default() takes no size and gives a bitmap font that only encodes latin-1."""
    def old_load_default(size=None):
        if size is not None:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return ImageFont.load_default_imagefont()
    monkeypatch.setattr(ImageFont, 'load_default', old_load_default)
    monkeypatch.setattr(fonts, 'cjk_font_candidates', lambda: [])  # and no font that draws Chinese
    run_main('train.py', '--epochs', 1, '--batch-size', 6, '--data-dir', chinese_classes, cwd=tmp_path)
    run_main('test.py', chinese_classes / 'test' / '猫', '--checkpoint', tmp_path / 'model' / 'best.pth',
             '--explain', tmp_path / 'explained', cwd=tmp_path)
    assert len(list((tmp_path / 'explained').glob('*.explain.png'))) == 3
    assert fonts.class_label('猫', 0) == '0'  # (what the pictures show instead)


def drawn(text: str) -> bytes:
    return bytes(fonts.font(24).getmask(text))


@pytest.mark.skipif(fonts.cjk_font_path() is None, reason='no font that draws Chinese on this machine')
def test_chinese_class_names_are_drawn_legibly_where_the_system_has_a_font():
    """Pillow's own font draws every Chinese character as the same box; a CJK font draws each its own."""
    assert drawn('猫') != drawn('狗') != drawn('马')
    grid = [Image.fromarray(confusion_image(torch.eye(2, dtype=torch.long), names)) for names in (['猫', '狗'],
                                                                                                  ['狗', '猫'])]
    assert grid[0].tobytes() != grid[1].tobytes()  # the labels show which class is which


def confusion_image(*args):
    from training.tblog import confusion_image as draw
    return draw(*args)


def test_without_a_chinese_font_the_index_and_the_ascii_letters_stand_in(fonts_found_again, monkeypatch):
    monkeypatch.setattr(fonts, 'cjk_font_path', lambda: None)
    assert fonts.class_label('猫', 3) == '3' and fonts.class_label('bird 鸟', 2) == '2 bird'
    assert fonts.class_label('Café', 1) == 'Café' and fonts.drawable('D:\\学习\\cat.jpg') == 'D:\\??\\cat.jpg'


# ---------------------------------------------------------------- Windows GPUs, compilers

def test_without_nccl_the_gpus_talk_through_gloo(monkeypatch):
    import torch.distributed as dist
    assert platforms.process_group_backend(cuda=False) == ('gloo', None)
    monkeypatch.setattr(dist, 'is_nccl_available', lambda: False)  # a Windows build of PyTorch
    backend, note = platforms.process_group_backend(cuda=True)
    assert backend == 'gloo' and 'no NCCL' in note and 'USE_LIBUV=0' in note
    monkeypatch.setattr(dist, 'is_nccl_available', lambda: True)
    assert platforms.process_group_backend(cuda=True) == ('nccl', None)


def test_compile_without_a_compiler_is_one_line_before_training(tmp_path):
    """What torch.compile needs on the CPU -- a C++ compiler -- is missing, as on most Windows machines."""
    empty = tmp_path / 'bin'
    empty.mkdir()
    result = subprocess.run([sys.executable, str(project_copy(tmp_path) / 'train.py'), '--dry-run', '--compile'],
                            cwd=tmp_path, env=script_env(PATH=str(empty), CXX=None), capture_output=True, text=True,
                            timeout=120)
    assert_clean_error(result, '--compile', 'needs a C++ compiler', 'g++ was not found', 'without --compile')


def test_a_compiler_that_fails_anyway_is_one_line(capsys):
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        failure = BackendCompilerFailed(lambda: None, InvalidCxxCompiler(), None)
    except TypeError:  # PyTorch before 2.8: (backend, inner exception)
        failure = BackendCompilerFailed(lambda: None, InvalidCxxCompiler())

    def main():
        raise failure
    with pytest.raises(SystemExit) as stopped:
        run(main)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count('\n') == 1
    assert err.startswith('error: --compile: torch.compile failed (InvalidCxxCompiler: No working C++ compiler')


# ---------------------------------------------------------------- Python versions

def test_the_code_runs_on_the_oldest_python_the_project_declares():
    """pyproject.toml says which Pythons the project supports; vermin reads every file for what needs newer."""
    pytest.importorskip('vermin', reason='vermin (requirements-dev.txt) reads the code for its Python')
    declared = re.search(r'requires-python\s*=\s*">=(\d+)\.(\d+)"', (ROOT / 'pyproject.toml').read_text())
    oldest = f'{declared[1]}.{declared[2]}'
    assert oldest == '3.9'
    files = [str(p) for p in [*ROOT.glob('*.py'), *(ROOT / 'training').glob('*.py'), *(ROOT / 'tests').glob('*.py')]]
    vermin = [sys.executable, '-c', 'import sys, vermin; sys.exit(vermin.main())']
    result = subprocess.run([*vermin, f'-t={oldest}-', '--violations', '--eval-annotations', '--no-tips',
                             '--no-config-file', *files], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
