"""A tutorial learner's first day: the whole-model .pth files the lessons save, refused files, --explain,
python model.py, fp16 on GPUs without bf16."""
import re
import subprocess
import sys
import unittest.mock

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (ROOT, assert_clean_error, fails_cleanly, load_weights, run_main, run_script, same_length,
                      write_image_folders)
from model import MyModel

LESSON_MODULE = '''
import torch
from torch import nn


class Tudui(nn.Module):  # lesson P27/P22: the learner's own class, the attribute {attribute}
    def __init__(self):
        super().__init__()
        self.{attribute} = nn.Sequential(
            nn.Conv2d(3, 32, 5, 1, 2), nn.MaxPool2d(2), nn.Conv2d(32, 32, 5, 1, 2), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, 1, 2), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.Linear(64, {out}))

    def forward(self, x):
        return self.{attribute}(x)
'''


def save_like_the_lessons(folder, name: str, attribute: str = 'model', out: int = 10, on_gpu: bool = False):
    """A throw-away module with class Tudui, and torch.save(tudui, name), as the lessons do; with ``on_gpu`` its
    tensors are tagged cuda:0, as a model trained on a GPU is. Then the module is gone (from this process and
    the disk), as on the learner's next machine. Returns the file and the weights it holds, in order."""
    import importlib.util
    source = folder / 'lesson_model.py'
    source.write_text(LESSON_MODULE.format(attribute=attribute, out=out))
    spec = importlib.util.spec_from_file_location('lesson_model', source)
    sys.modules['lesson_model'] = lesson = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(lesson)
        torch.manual_seed(3)
        tudui = lesson.Tudui()
        tag = (lambda storage: 'cuda:0') if on_gpu else torch.serialization.location_tag
        with unittest.mock.patch.object(torch.serialization, 'location_tag', tag):
            torch.save(tudui, folder / name)
    finally:
        del sys.modules['lesson_model']
        source.unlink()
    return folder / name, [t.detach().clone() for t in tudui.state_dict().values()]


@pytest.mark.parametrize('attribute, on_gpu', [('model', False), ('model1', True)])
def test_a_whole_model_saved_by_the_lessons_classifies_in_a_fresh_process(tmp_path, attribute, on_gpu):
    path, expected = save_like_the_lessons(tmp_path, 'tudui_29_gpu.pth', attribute, on_gpu=on_gpu)
    if on_gpu and not torch.cuda.is_available():
        with pytest.raises(Exception):  # what the lessons' own torch.load(path) meets today
            torch.load(path, map_location='cpu', weights_only=True)
    result = run_script('test.py', ROOT / 'images' / 'cat.jpg', '--checkpoint', path, '--json', cwd=tmp_path)
    assert 'cat.jpg' in result.stdout
    text = run_script('test.py', ROOT / 'images' / 'cat.jpg', '--checkpoint', path, cwd=tmp_path).stdout
    assert 'a whole Tudui model as the lessons save it' in text
    # the same weights, in MyModel's layers
    from training.checkpoint import load_checkpoint
    loaded = load_checkpoint(path)['model']
    assert list(loaded) == list(MyModel().state_dict())
    assert all(torch.equal(a, b) for a, b in zip(loaded.values(), expected))


@pytest.mark.parametrize('out', [10, 7])
def test_a_whole_model_is_read_in_this_process_with_the_classes_its_last_layer_has(tmp_path, out):
    from training.checkpoint import load_checkpoint
    path, expected = save_like_the_lessons(tmp_path, 'tudui_9.pth', out=out)
    loaded = load_checkpoint(path)
    assert loaded['whole_model']['class'] == 'Tudui' and loaded['classes'] is None
    model = MyModel(num_classes=out)
    model.load_state_dict(loaded['model'])  # MyModel's keys, and shapes
    assert all(torch.equal(a, b) for a, b in same_length(model.state_dict().values(), expected))


def test_convert_writes_a_plain_state_dict_and_never_overwrites(tmp_path):
    path, expected = save_like_the_lessons(tmp_path, 'tudui_29.pth', on_gpu=True)
    said = run_main('test.py', ROOT / 'images' / 'cat.jpg', '--checkpoint', path.name, '--device', 'cpu',
                    cwd=tmp_path).stdout
    assert said.startswith('checkpoint: tudui_29.pth (a whole Tudui model as the lessons save it, its weights read '
                           'without running its code; 10 classes); device: cpu\n')
    result = run_main('test.py', '--checkpoint', path, '--convert', 'plain.pth', cwd=tmp_path)
    assert 'converted' in result.stdout
    plain = torch.load(tmp_path / 'plain.pth', weights_only=True)  # what the lessons' own code can load now
    model = MyModel()
    model.load_state_dict(plain)
    assert all(torch.equal(a, b) for a, b in zip(plain.values(), expected))
    before = (tmp_path / 'plain.pth').read_bytes()
    fails_cleanly('test.py', ['--checkpoint', path, '--convert', 'plain.pth'], tmp_path, 'already exists')
    assert (tmp_path / 'plain.pth').read_bytes() == before


def test_a_whole_model_of_another_network_is_one_line_naming_what_it_holds(tmp_path):
    path, _ = save_like_the_lessons(tmp_path, 'other.pth', out=7)  # 7 outputs still fit: 7 classes
    run_main('test.py', ROOT / 'images' / 'cat.jpg', '--checkpoint', path, cwd=tmp_path)
    (tmp_path / 'lesson_model.py').write_text('import torch\nclass Tiny(torch.nn.Module):\n'
                                              '    def __init__(self):\n        super().__init__()\n'
                                              '        self.fc = torch.nn.Linear(3, 2)\n')
    subprocess.run([sys.executable, '-c', 'import torch, lesson_model; torch.save(lesson_model.Tiny(), "tiny.pth")'],
                   cwd=tmp_path, check=True)
    line = fails_cleanly('test.py', [ROOT / 'images' / 'cat.jpg', '--checkpoint', tmp_path / 'tiny.pth'], tmp_path,
                         'whole Tiny model', 'fc.weight [2, 3]', 'do not fit MyModel')
    assert '\x1b' not in line


def test_a_zip_archive_whose_start_reads_as_text_is_not_called_a_text_file(tmp_path):
    """torch.save writes a zip archive; one that is not a checkpoint is reported as unreadable, even when its first
    512 bytes happen to be plain ASCII (a stored text file, its checksum bytes all below 128)."""
    import itertools
    import zipfile
    import zlib
    for n in itertools.count():
        text = f'my notes, zipped and renamed by mistake {n}\n' * 14
        if all(b < 0x80 for b in zlib.crc32(text.encode()).to_bytes(4, 'little')):
            break
    with zipfile.ZipFile(tmp_path / 'notes.pth', 'w', zipfile.ZIP_STORED) as archive:
        archive.writestr(zipfile.ZipInfo('notes.txt', date_time=(1980, 1, 1, 0, 0, 0)), text)
    (tmp_path / 'notes.pth').read_bytes()[:512].decode('ascii')  # (what the case is about)
    line = fails_cleanly('test.py', [ROOT / 'images' / 'cat.jpg', '--checkpoint', tmp_path / 'notes.pth'], tmp_path,
                         'is not a readable PyTorch checkpoint')
    assert 'text file' not in line


class Payload:
    def __reduce__(self):
        import subprocess
        return subprocess.call, (['touch', 'PWNED'],)


@pytest.mark.parametrize('content, what', [
    (b'', 'it is empty (0 bytes)'), ((ROOT / 'images' / 'cat.jpg').read_bytes(), 'it is a JPEG image'),
    ((ROOT / 'images' / 'dog.png').read_bytes(), 'it is a PNG image'), (b'hello, not weights\n', 'it is a text file'),
    (('notes: ' + '这不是权重。' * 40).encode('utf-8'), 'it is a text file')],  # (its 512th byte cuts a character)
    ids=['empty', 'jpeg', 'png', 'text', 'chinese text'])
def test_a_file_that_is_not_a_checkpoint_says_what_it_is(tmp_path, content, what):
    (tmp_path / 'x.pth').write_bytes(content)
    line = fails_cleanly('test.py', [ROOT / 'images' / 'cat.jpg', '--checkpoint', tmp_path / 'x.pth'], tmp_path,
                         'is not a PyTorch checkpoint')
    assert f' is not a PyTorch checkpoint: {what}; give a .pth file saved by torch.save' in line


def test_a_pickle_that_would_run_code_is_refused_in_one_clean_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({'model.0.weight': Payload()}, tmp_path / 'evil.pth')
    line = fails_cleanly('test.py', [ROOT / 'images' / 'cat.jpg', '--checkpoint', tmp_path / 'evil.pth'], tmp_path,
                         'refused to load', '.call (code, not weights)', 'only load checkpoints you trust')
    assert '\x1b' not in line and 'weights_only' not in line  # no torch text, no terminal colours
    assert not (tmp_path / 'PWNED').exists()


def test_a_data_set_with_one_class_is_one_line(tmp_path):
    data = write_image_folders(tmp_path / 'one', classes=('cat',), train=4, test=2)
    fails_cleanly('train.py', ['--data-dir', data, '--epochs', 1], tmp_path, 'one class folder', 'at least two')


# ---------------------------------------------------------------- --explain

def test_explain_writes_one_figure_per_image_with_its_parts(trained, tmp_path):
    from training import explain
    work, _ = trained
    result = run_main('test.py', ROOT / 'images', '--checkpoint', work / 'model' / 'best.pth', '--top-k', 3,
                      '--explain', 'why', cwd=tmp_path)
    figures = sorted((tmp_path / 'why').iterdir())
    assert [p.name for p in figures] == ['cat.explain.png', 'dog.explain.png', 'dog_rgba.explain.png']
    assert 'explained: why/cat.explain.png' in result.stdout
    figure = np.asarray(Image.open(tmp_path / 'why' / 'dog.explain.png').convert('RGB')).astype(int)
    boxes = explain.layout()
    assert figure.shape[1] == boxes['bars'][2] + explain.MARGIN
    # the model's view: the 32x32 input, each pixel an 8x8 square (inside the grid lines)
    import test as classify
    pixels = (classify.load_image(ROOT / 'images' / 'dog.png').permute(1, 2, 0) * 255).round().numpy()
    left, top = boxes['model_view'][:2]
    square = explain.PANEL // 32
    centres = figure[top + square // 2:top + explain.PANEL:square, left + square // 2:left + explain.PANEL:square]
    assert np.abs(centres - pixels).max() <= 1
    # the heat map is drawn over the picture: not the picture itself
    l, t, r, b = boxes['grad_cam']
    assert figure[t:b, l:r].std() > 5
    # the bars: the top guess's bar is the longest
    l, t, r, b = boxes['bars']
    bar_rows = figure[t:b, l:r]
    orange = (bar_rows[..., 0] > 200) & (bar_rows[..., 1] < 120)
    assert orange.any()


def test_grad_cam_follows_the_class_it_is_asked_about(trained):
    from test import load_image
    from training.checkpoint import build_model, load_checkpoint
    from training.explain import grad_cam
    work, _ = trained
    model = build_model(load_checkpoint(work / 'model' / 'best.pth')['model'])
    image = load_image(ROOT / 'images' / 'dog.png')
    predicted = int(model(image[None]).argmax())
    cam, target = grad_cam(model, image)
    assert target == predicted and cam.shape == (8, 8) and 0 <= cam.min() and cam.max() <= 1
    same, _ = grad_cam(model, image, target=predicted)
    assert torch.equal(cam, same)
    other, _ = grad_cam(model, image, target=(predicted + 1) % 10)
    assert not torch.equal(cam, other)


def test_an_unsure_answer_says_what_a_cifar10_model_knows(tmp_path):
    torch.manual_seed(0)
    torch.save(MyModel().state_dict(), tmp_path / 'untrained.pth')  # about 10 % for every class
    result = run_main('test.py', ROOT / 'images' / 'cat.jpg', '--checkpoint', tmp_path / 'untrained.pth',
                      cwd=tmp_path)
    assert 'the model is unsure about cat.jpg' in result.stdout and '32x32' in result.stdout


# ---------------------------------------------------------------- python model.py

def test_python_model_py_prints_the_shape_and_a_row_per_layer():
    out = subprocess.run([sys.executable, str(ROOT / 'model.py')], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0] == 'torch.Size([64, 10])'
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows['model.5'][2:5] == ['64', 'x', '4']  # where 64*4*4 comes from
    assert rows['model.6'][2] == '1024'
    assert rows['total'][1] == f'{sum(p.numel() for p in MyModel().parameters()):,}' == '145,578'
    assert rows['model.0'][-1] == f'{32 * 32 * 32 * 3 * 5 * 5:,}'


# ---------------------------------------------------------------- fp16

@pytest.mark.parametrize('capability, bf16, expected', [((7, 5), False, torch.float16), ((8, 0), True, torch.bfloat16),
                                                        ((6, 1), False, None), ((6, 0), False, torch.float16)])
def test_auto_precision_on_each_kind_of_gpu(monkeypatch, capability, bf16, expected):
    from training.device import autocast_dtype
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: bf16)
    assert autocast_dtype('auto', torch.device('cuda')) == expected
    assert autocast_dtype('fp16', torch.device('cuda')) == torch.float16


FP16 = ('--precision', 'fp16', '--batch-size', 16, '--log-interval', 2, '--quiet', '--epochs', 2)


@pytest.fixture(scope='session')
def small_folders(tmp_path_factory):
    return write_image_folders(tmp_path_factory.mktemp('fp16'), train=20, test=6)


def test_fp16_on_the_cpu_trains_keeps_its_loss_scale_and_resumes_exactly(small_folders, interrupter, tmp_path):
    """As far as the CPU allows: fp16 autocast and the gradient scaler run; only a GPU shows the speed."""
    flags = (*FP16, '--data-dir', small_folders, '--device', 'cpu')
    run_main('train_gpu_2.py', *flags, '--checkpoint-dir', 'whole', cwd=tmp_path)
    state = load_weights(tmp_path / 'whole' / 'last.pth')
    assert state['config']['precision'] == 'fp16' and state['scaler']['scale'] > 0
    result = interrupter.run('train_gpu_2.py', *flags, '--checkpoint-dir', 'cut', cwd=tmp_path, at=[5])
    assert result.returncode == 130
    run_main('train_gpu_2.py', *flags, '--checkpoint-dir', 'cut', '--resume', cwd=tmp_path)
    resumed = load_weights(tmp_path / 'cut' / 'last.pth')
    assert resumed['scaler'] == state['scaler']
    assert all(torch.equal(resumed['model'][k], state['model'][k]) for k in state['model'])


def test_the_gradient_scaler_skips_overflowing_steps_and_lowers_its_scale(small_folders, tmp_path, monkeypatch):
    from training.device import Autocast
    monkeypatch.setattr(Autocast, 'grad_scaler', lambda self: torch.amp.GradScaler('cpu', init_scale=2.0 ** 100))
    run_main('train_gpu_2.py', *FP16, '--data-dir', small_folders, '--device', 'cpu', cwd=tmp_path)
    state = load_weights(tmp_path / 'model' / 'last.pth')
    assert state['scaler']['scale'] < 2.0 ** 100  # halved at each overflowing step, which was skipped
    assert all(torch.isfinite(t).all() for t in state['model'].values())


def test_fp16_is_refused_in_one_line_where_autocast_cannot_do_it(tmp_path):
    from training.device import autocast_dtype
    from training.errors import UserError
    with pytest.raises(UserError, match='--precision fp16 is not supported on mps'):
        autocast_dtype('fp16', torch.device('mps'))
    assert_clean_error(run_script('train.py', '--precision', 'fp64', cwd=tmp_path, check=False), 'fp64')


LEARNER_FILES = ['model.py', 'train.py', 'train_gpu_1.py', 'train_gpu_2.py', 'train_ddp.py', 'test.py']
REQUIRED = {'torch', 'torchvision', 'PIL', 'numpy', 'tensorboard', 'tqdm'}  # requirements.txt, by import name
STDLIB = getattr(sys, 'stdlib_module_names', None)  # (Python 3.10 on)


@pytest.mark.skipif(STDLIB is None, reason='needs Python 3.10 to tell the standard library')
def test_training_and_test_py_import_only_what_requirements_txt_installs():
    """matplotlib and the other development requirements are for the developer tools only."""
    import ast
    files = [ROOT / name for name in LEARNER_FILES] + sorted((ROOT / 'training').glob('*.py'))
    outside = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                top = name.split('.')[0]
                if top not in REQUIRED | {'model', 'training'} and top not in STDLIB:
                    outside.setdefault(top, []).append(path.name)
    assert outside == {}
    listed = {re.split(r'[<>=; ]', line)[0] for line in (ROOT / 'requirements.txt').read_text().splitlines()
              if line and not line.startswith('#')}
    assert listed == {'torch', 'torchvision', 'pillow', 'numpy', 'tensorboard', 'tqdm'}
