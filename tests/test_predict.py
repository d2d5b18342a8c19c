"""test.py: classifying pictures with a trained checkpoint or the tutorial's plain state_dict."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (CPU, ROOT, assert_clean_error, fails_cleanly, load_weights, run_main, script_module,
                      write_image_folders)
from model import MyModel

LINE = re.compile(r'^(?P<path>\S+): (?P<name>\w+)(?: \S+)? \((?P<p>[\d.]+)%\)   top 3: (?P<top>.+)$')


def predictions(stdout):
    return {m['path']: m for m in map(LINE.match, stdout.splitlines()) if m}


def test_no_arguments_classifies_the_dog_with_the_newest_checkpoint(trained):
    work, _ = trained
    (work / 'images').mkdir(exist_ok=True)
    for picture in ('dog.png', 'cat.jpg'):  # the dog alone is the default, not the whole folder
        (work / 'images' / picture).write_bytes((ROOT / 'images' / picture).read_bytes())
    result = run_main('test.py', *CPU, cwd=work)  # (on a GPU machine: the CPU, as the expectation below)
    assert result.stdout.startswith(f'checkpoint: {"model/last.pth"} (10 classes, epoch 2')
    found = predictions(result.stdout)
    assert list(found) == ['images/dog.png']
    top = found['images/dog.png']['top'].split(', ')
    printed = [float(t.rsplit(' ', 1)[1].rstrip('%')) for t in top]
    model = MyModel().eval()  # what the newest checkpoint says about the 32x32 dog, worked out here
    model.load_state_dict(load_weights(work / 'model' / 'last.pth')['model'])
    with torch.no_grad():
        expected = model(script_module('test.py').load_image(ROOT / 'images' / 'dog.png')[None]).softmax(1)[0]
    assert printed == pytest.approx((expected.topk(3).values * 100).tolist(), abs=0.051)  # printed to 0.1 %
    assert found['images/dog.png']['name'] in top[0]


def test_every_sample_picture_and_a_folder(trained):
    work, _ = trained
    result = run_main('test.py', ROOT / 'images', '--checkpoint', work / 'model' / 'best.pth', cwd=work)
    names = sorted(p.name for p in (ROOT / 'images').iterdir())
    assert sorted(p.rsplit('/', 1)[1] for p in predictions(result.stdout)) == names


def test_two_folders_give_the_pictures_of_both_with_the_chinese_names(trained, tmp_path):
    work, _ = trained
    for folder, picture in (('a', 'cat.jpg'), ('b', 'dog.png')):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / picture).write_bytes((ROOT / 'images' / picture).read_bytes())
    result = run_main('test.py', 'a', 'b', '--checkpoint', work / 'model' / 'best.pth', cwd=tmp_path)
    found = predictions(result.stdout)
    assert sorted(found) == ['a/cat.jpg', 'b/dog.png']
    chinese = script_module('test.py').CHINESE_NAMES
    for match in found.values():  # the best guess, then each of the top 3, with its Chinese name
        assert f"{match['name']} {chinese[match['name']]} (" in match.string
        assert all(f'{name} {chinese[name]} ' in match['top'] for name in re.findall(r'([a-z]+) \S+ [\d.]+%',
                                                                                     match['top']))


def test_help_shows_the_examples_as_written(tmp_path):
    result = run_main('test.py', '--help', cwd=tmp_path)
    doc = script_module('test.py').__doc__
    example = next(line for line in doc.splitlines() if '--top-k 5' in line)
    assert result.stdout.startswith('usage: ') and f'\n{example}\n' in result.stdout  # on its own line, as written
    assert '[--explain DIR]' in result.stdout and '[--convert OUT]' in result.stdout


@pytest.mark.parametrize('extra', [['--eval'], ['--explain', 'out'], [ROOT / 'images' / 'cat.jpg']])
def test_convert_takes_nothing_but_the_checkpoint(extra, tmp_path):
    torch.save(MyModel().state_dict(), tmp_path / 'plain.pth')
    fails_cleanly('test.py', ['--checkpoint', 'plain.pth', '--convert', 'out.pth', *extra], tmp_path,
                  '--convert only converts the --checkpoint')
    assert not (tmp_path / 'out.pth').exists()


def test_a_checkpoint_saved_on_a_gpu_classifies_and_converts_on_a_machine_without_one(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:  # what torch.save records for tensors that live on a GPU
        patch.setattr(torch.serialization, 'location_tag', lambda storage: 'cuda:0')
        torch.save(MyModel().state_dict(), tmp_path / 'gpu.pth')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)  # (also on a machine that has one)
    result = run_main('test.py', ROOT / 'images' / 'cat.jpg', '--checkpoint', 'gpu.pth', '--device', 'cpu',
                      cwd=tmp_path)
    assert len(predictions(result.stdout)) == 1
    run_main('test.py', '--checkpoint', 'gpu.pth', '--convert', 'plain.pth', cwd=tmp_path)
    assert list(torch.load(tmp_path / 'plain.pth', weights_only=True)) == list(MyModel().state_dict())


@pytest.mark.parametrize('flag, values', [('--device', ['auto', 'cpu', 'cuda', 'mps']),
                                          ('--precision', ['auto', 'fp32', 'bf16', 'fp16'])])
def test_each_documented_choice_is_accepted_and_no_other(flag, values, tmp_path):
    torch.save(MyModel().state_dict(), tmp_path / 'plain.pth')
    for value in values:  # (a device this machine lacks is refused later, in a line of its own)
        result = run_main('test.py', ROOT / 'images' / 'cat.jpg', '--checkpoint', 'plain.pth', flag, value,
                          cwd=tmp_path, check=False)
        assert 'invalid choice' not in result.stderr, (value, result.stderr)
    assert_clean_error(run_main('test.py', '--checkpoint', 'plain.pth', flag, 'tpu', cwd=tmp_path, check=False),
                       f"{flag}: invalid choice: 'tpu'")


def test_the_first_line_says_what_the_checkpoint_is_and_how_its_images_are_prepared(tmp_path):
    from training.checkpoint import model_bundle
    from training.data import CIFAR10_CLASSES
    torch.save(MyModel().state_dict(), tmp_path / 'plain.pth')
    torch.save(model_bundle(MyModel().state_dict(), CIFAR10_CLASSES, normalize={'mean': [0.5] * 3, 'std': [0.25] * 3},
                            config={'tta': True}, epoch=4, test_accuracy=0.625), tmp_path / 'mirror.pth')
    torch.save(model_bundle(MyModel().state_dict(), CIFAR10_CLASSES, normalize=None,
                            config={'tta': True, 'tta_views': 3, 'tta_shift': 1}), tmp_path / 'fast.pth')
    torch.save(model_bundle(MyModel().state_dict(), CIFAR10_CLASSES, normalize=None,
                            config={'tta': True, 'tta_views': 3, 'tta_shift': 1, 'tta_diagonal': True}),
               tmp_path / 'diagonal.pth')
    for name, expected in (('plain.pth', 'checkpoint: plain.pth (10 classes); device: cpu\n'),
                           ('mirror.pth', 'checkpoint: mirror.pth (10 classes, epoch 5, test accuracy 62.5%); '
                                          'device: cpu; normalised as in training; with the image and its mirror '
                                          'image (TTA)\n'),
                           ('fast.pth', 'checkpoint: fast.pth (10 classes); device: cpu; with the image and its mirror '
                                        'image moved 1 px right and left (TTA)\n'),
                           ('diagonal.pth', 'checkpoint: diagonal.pth (10 classes); device: cpu; with the image and '
                                            'its mirror image moved 1 px right and down, and left and up (TTA)\n')):
        result = run_main('test.py', ROOT / 'images' / 'cat.jpg', '--checkpoint', name, '--device', 'cpu',
                          cwd=tmp_path)
        assert result.stdout.startswith(expected), result.stdout


@pytest.mark.filterwarnings('ignore:Tag data larger than file')
def test_a_photo_whose_exif_data_is_damaged_is_still_classified(tmp_path):
    """Pillow warns about such EXIF data (and skips it); only an oversized picture's warning stops test.py."""
    torch.save(MyModel().state_dict(), tmp_path / 'plain.pth')
    damaged = b'Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00\x0e\x01\x02\x00\xff\xff\x00\x00\x50\x00\x00\x00'
    with pytest.warns(UserWarning, match='EXIF'):
        Image.new('RGB', (40, 30), (200, 30, 30)).save(tmp_path / 'photo.jpg', exif=damaged)
        result = run_main('test.py', 'photo.jpg', '--checkpoint', 'plain.pth', cwd=tmp_path)
    assert list(predictions(result.stdout)) == ['photo.jpg']


def test_plain_tutorial_state_dict_loads_with_cifar_names(tmp_path):
    torch.manual_seed(0)
    torch.save(MyModel().state_dict(), tmp_path / 'model_29.pth')
    result = run_main('test.py', ROOT / 'images' / 'cat.jpg', '--checkpoint', 'model_29.pth', cwd=tmp_path)
    assert 'checkpoint: model_29.pth (10 classes)' in result.stdout
    (match,) = predictions(result.stdout).values()
    assert match['name'] in ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                             'ship', 'truck')


def test_probabilities_match_the_model(tmp_path):
    """The printed top-1 probability is the model's own softmax on the 32x32 image."""
    torch.manual_seed(3)
    model = MyModel()
    torch.save(model.state_dict(), tmp_path / 'm.pth')
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / 'grey.png')
    result = run_main('test.py', 'grey.png', '--checkpoint', 'm.pth', cwd=tmp_path)
    p = model(torch.full((1, 3, 32, 32), 200 / 255)).softmax(1)[0]
    (match,) = predictions(result.stdout).values()
    assert float(match['p']) == pytest.approx(p.max().item() * 100, abs=0.06)


@pytest.mark.parametrize('mode', ['RGBA', 'LA', 'L', 'P', 'I;16', 'CMYK', '1'])
def test_any_image_mode_and_size(mode, trained, tmp_path):
    work, _ = trained
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    if mode == 'I;16':
        picture = Image.fromarray((np.asarray(picture.convert('L'), np.uint16) * 257))
    else:
        picture = picture.convert(mode)
    picture.save(tmp_path / 'picture.png' if mode != 'CMYK' else tmp_path / 'picture.jpg')
    path = next(tmp_path.glob('picture.*'))
    result = run_main('test.py', path, '--checkpoint', work / 'model' / 'last.pth', cwd=tmp_path)
    assert len(predictions(result.stdout)) == 1


@pytest.mark.parametrize('name, make, rgb', [
    ('transparent.png', lambda: Image.new('RGBA', (40, 30), (255, 0, 0, 0)), (255, 255, 255)),  # shown on white
    ('half.png', lambda: Image.new('LA', (40, 30), (0, 128)), (127, 127, 127)),  # black, half covering white
    ('deep.png', lambda: Image.fromarray(np.full((30, 40), 128 * 257, np.uint16)), (128, 128, 128)),  # scaled
    ('print.tif', lambda: Image.new('CMYK', (40, 30), (0, 255, 255, 0)), (255, 0, 0)),  # cyan-free: red
])
def test_unusual_image_modes_become_the_rgb_they_show(name, make, rgb, tmp_path):
    make().save(tmp_path / name)
    image = script_module('test.py').load_image(tmp_path / name)
    assert image.shape == (3, 32, 32)
    expected = torch.tensor(rgb, dtype=torch.float32).div(255).view(3, 1, 1).expand(3, 32, 32)
    assert torch.allclose(image, expected, atol=1 / 255 + 1e-6), image[:, 0, 0] * 255


def test_each_image_mode_becomes_the_8_bit_rgb_it_shows(tmp_path):
    """to_rgb pixel by pixel: 16- and 32-bit grey scaled to 0..255 (rounded, never wrapped round), float images
    in [0, 1] scaled and clipped, every kind of transparency shown over white."""
    to_rgb = script_module('test.py').to_rgb

    def pixels(image):
        return [tuple(p) for p in np.asarray(to_rgb(image)).reshape(-1, 3).tolist()]

    def grey(*values):
        return [(v, v, v) for v in values]

    assert pixels(Image.fromarray(np.array([[0, 33025, 51400, 65535]], np.uint16))) == grey(0, 129, 200, 255)
    assert pixels(Image.fromarray(np.array([[-1000, 51400, 100_000]], np.int32))) == grey(0, 200, 255)  # mode I
    assert pixels(Image.fromarray(np.array([[-0.5, 0.0, 0.5, 0.8, 2.0]], np.float32))) == grey(0, 0, 128, 204, 255)
    rgba = Image.new('RGBA', (3, 1), (255, 0, 0, 0))  # transparent red, then black, then half-covering blue
    rgba.putpixel((1, 0), (0, 0, 0, 255))
    rgba.putpixel((2, 0), (0, 0, 255, 128))
    assert pixels(rgba) == [(255, 255, 255), (0, 0, 0), (127, 127, 255)]
    assert pixels(rgba.convert('PA')) == [(255, 255, 255), (0, 0, 0), (127, 127, 255)]  # (web palette colours)
    for mode in ('P', 'L', 'RGB'):  # PNGs with a transparent colour (tRNS): black here
        image = Image.new('RGB', (2, 1), (0, 0, 0))
        image.putpixel((1, 0), (0, 200, 0))
        image = image.convert(mode)
        image.save(tmp_path / f'{mode}.png', transparency=image.getpixel((0, 0)))
        with Image.open(tmp_path / f'{mode}.png') as saved:
            assert 'transparency' in saved.info
            assert pixels(saved)[0] == (255, 255, 255) and pixels(saved)[1] != (255, 255, 255), mode


def test_custom_classes_are_named_from_the_checkpoint(tmp_path):
    data = write_image_folders(tmp_path / 'pets', train=16, test=6)
    run_main('train.py', '--epochs', 1, '--batch-size', 8, '--data-dir', data, cwd=tmp_path)
    result = run_main('test.py', data / 'test' / 'dog', '--checkpoint', 'model/best.pth', cwd=tmp_path)
    names = {m['name'] for m in predictions(result.stdout).values()}
    assert names and names <= {'cat', 'dog', 'horse'}
    assert '(3 classes' in result.stdout


@pytest.mark.parametrize('args, fragment', [
    (['missing.png'], 'missing.png'),
    ([ROOT / 'images' / 'dog.png', '--checkpoint', 'nowhere.pth'], 'nowhere.pth not found'),
])
def test_missing_files_are_one_line_errors(args, fragment, trained):
    work, _ = trained
    result = run_main('test.py', *args, cwd=work, check=False)
    assert_clean_error(result, fragment)


def test_no_checkpoint_yet_says_train_first(tmp_path):
    result = run_main('test.py', ROOT / 'images' / 'dog.png', cwd=tmp_path, check=False)
    assert_clean_error(result, 'no checkpoint', 'train')


def test_json_output_for_images(trained):
    work, _ = trained
    result = run_main('test.py', ROOT / 'images', '--json', '--top-k', 4, '--checkpoint',
                      work / 'model' / 'best.pth', cwd=work)
    report = json.loads(result.stdout)
    assert len(report['predictions']) == 3 and report['classes'][3] == 'cat'
    for prediction in report['predictions']:
        probabilities = [t['probability'] for t in prediction['top']]
        assert len(probabilities) == 4 and probabilities == sorted(probabilities, reverse=True)
        chinese = script_module('test.py').CHINESE_NAMES
        assert [t['chinese'] for t in prediction['top']] == [chinese[t['class']] for t in prediction['top']]
        assert 0 < sum(probabilities) <= 1 + 1e-6


def test_eval_agrees_with_training_and_explains_the_mistakes(trained, cifar_dir):
    work, _ = trained
    checkpoint = load_weights(work / 'model' / 'last.pth')
    result = run_main('test.py', '--eval', '--json', '--data-dir', cifar_dir, '--checkpoint',
                      work / 'model' / 'last.pth', *CPU, cwd=work)  # where training evaluated
    report = json.loads(result.stdout)
    assert report['checkpoint'] == str(work / 'model' / 'last.pth') and report['images'] == 200
    assert report['accuracy'] == pytest.approx(checkpoint['test_accuracy'])  # same number training logged
    confusion = torch.tensor(report['confusion'])
    assert confusion.sum() == 200 and confusion.trace() == round(report['accuracy'] * 200)
    assert [row['images'] for row in report['per_class']] == confusion.sum(1).tolist()
    assert report['per_class'][3]['chinese'] == '猫'
    confidences = [m['probability'] for m in report['mistakes']]
    assert confidences == sorted(confidences, reverse=True)
    assert all(m['true'] != m['predicted'] for m in report['mistakes'])
    text = run_main('test.py', '--eval', '--data-dir', cifar_dir, '--checkpoint', work / 'model' / 'last.pth',
                    cwd=work).stdout
    assert 'confusion matrix' in text and 'most confident mistakes' in text and 'cat 猫' in text


def test_eval_of_a_data_set_too_big_for_memory_streams_it_to_the_same_report(trained, cifar_dir, monkeypatch):
    import training.batches
    work, _ = trained
    argv = ('--eval', '--json', '--data-dir', cifar_dir, '--checkpoint', work / 'model' / 'last.pth', *CPU)
    in_memory = json.loads(run_main('test.py', *argv, cwd=work).stdout)
    monkeypatch.setattr(training.batches, 'fits_in_memory', lambda data, device: False)  # as for a big one
    streamed = json.loads(run_main('test.py', *argv, cwd=work).stdout)
    assert streamed == in_memory


def test_eval_of_a_plain_state_dict_runs_in_fp32_batches_of_500_unless_told(trained, cifar_dir):
    """A model_{i}.pth (the tutorial's plain state_dict) does not say how its run evaluated: fp32, batches of 500;
    a checkpoint of the project is evaluated as its run did, unless --precision says otherwise."""
    work, _ = trained
    def report(name, *flags):
        return json.loads(run_main('test.py', '--eval', '--json', '--data-dir', cifar_dir, '--checkpoint',
                                   work / 'model' / name, *flags, *CPU, cwd=work).stdout)
    plain, bundle, told = report('model_1.pth'), report('last.pth'), report('last.pth', '--precision', 'fp32')
    assert (plain['precision'], plain['batch_size'], plain['as_trained']) == ('fp32', 500, False)
    assert (bundle['precision'], bundle['batch_size'], bundle['as_trained']) == ('fp32', 16, True)
    assert (told['batch_size'], told['as_trained']) == (16, False)
    assert plain['accuracy'] == bundle['accuracy']  # the same weights
    first = report('model_0.pth')  # after one epoch, often wrong: the 5 most confident mistakes listed
    assert first['accuracy'] < 0.9 and len(first['mistakes']) == 5


def test_eval_on_a_data_set_with_other_classes_is_refused(trained, tmp_path):
    work, _ = trained
    pets = write_image_folders(tmp_path / 'pets', train=2, test=2)
    result = run_main('test.py', '--eval', '--data-dir', pets, '--checkpoint', work / 'model' / 'last.pth',
                      cwd=work, check=False)
    assert_clean_error(result, '--data-dir')


def display_width(text: str) -> int:
    """Columns a terminal gives ``text``: a Chinese character takes two."""
    import unicodedata
    return sum(2 if unicodedata.east_asian_width(ch) in 'WF' else 1 for ch in text)


@pytest.mark.parametrize('as_trained', [True, False])
def test_the_eval_text_shows_every_figure_of_the_report_in_aligned_columns(as_trained):
    """--eval's text, read back: the same figures as its JSON, each table's columns aligned on the terminal
    (Chinese names two columns wide), long class names cut to their column."""
    from training.report import format_report
    classes = ['airplane', 'cat', 'hummingbirds']  # (a custom class: no Chinese name, longer than a column)
    report = {'checkpoint': 'model/best.pth', 'data': 'dataset/', 'images': 8, 'precision': 'bf16', 'batch_size': 4,
              'as_trained': as_trained, 'accuracy': 0.625, 'loss': 1.23456, 'classes': classes,
              'per_class': [{'class': 'airplane', 'chinese': '飞机', 'accuracy': 0.5, 'images': 4},
                            {'class': 'cat', 'chinese': '猫', 'accuracy': 1.0, 'images': 3},
                            {'class': 'hummingbirds', 'chinese': None, 'accuracy': 0.0, 'images': 1}],
              'confusion': [[2, 1, 1], [0, 3, 0], [1, 0, 0]],
              'mistakes': [{'index': 5, 'file': 'dataset/test/cat/5.png', 'true': 'airplane', 'predicted': 'cat',
                            'probability': 0.875},
                           {'index': 7, 'file': None, 'true': 'hummingbirds', 'predicted': 'airplane',
                            'probability': 0.5}]}
    head, per_class, confusion, mistakes = format_report(report).split('\n\n')
    assert head.split('\n') == [
        'checkpoint: model/best.pth; test split of dataset/',
        'accuracy: 62.50% (5/8), mean loss 1.2346 (bf16, batches of 4'
        + (', as its training run evaluated)' if as_trained else ')')]
    header, *rows = per_class.split('\n')
    assert header.split() == ['class', 'accuracy', 'images']
    assert [row.split()[-2:] for row in rows] == [['50.0%', '4'], ['100.0%', '3'], ['0.0%', '1']]
    assert [row.rsplit(None, 2)[0] for row in rows] == ['airplane 飞机', 'cat 猫', 'hummingbirds']
    ends = {display_width(line) for line in per_class.split('\n')}  # every line ends at the same column ...
    accuracy_ends = {display_width(line[:line.index(line.split()[-2]) + len(line.split()[-2])])
                     for line in per_class.split('\n')}  # ... as does the accuracy column
    assert len(ends) == len(accuracy_ends) == 1
    title, names, *matrix = confusion.split('\n')
    assert title == 'confusion matrix (rows: true class, columns: predicted)'
    assert names == ' ' * 12 + ''.join(f'{c[:5]:>6}' for c in classes)  # under each column of counts, its class
    assert [row[:12] for row in matrix] == ['airplane    ', 'cat         ', 'hummingbird ']
    assert [[int(n) for n in row[12:].split()] for row in matrix] == report['confusion']
    assert {len(row) for row in matrix} == {len(names)}
    assert mistakes.split('\n') == ['most confident mistakes:',
                                    '  dataset/test/cat/5.png: is airplane 飞机, predicted cat 猫 (87.5%)',
                                    '  test image #7: is hummingbirds, predicted airplane 飞机 (50.0%)']
