"""Each recipe ingredient proven to act, in all four training scripts and in test.py; best.pth proven to be the
best epoch; the checkpoints' fields proven to be those of the epoch they claim.

The cases are built so that the behaviour shows, not by redoing the code: tiny image folders trained for one
or two steps, each step one batch of the whole training split (so the data order cannot matter), compared
with a run without the ingredient. One SGD step from the seed's initial weights w0 is w1 = w0 - lr * g, and
what an ingredient does to it follows from its definition: weight decay adds lr * decay * w0 to the weights
(not the biases), Nesterov's first step is (1 + momentum) times the plain one, label smoothing moves the last
layer's biases by lr * smoothing * (class frequency - 1/classes), clipping leaves a step of length lr * norm,
normalisation makes training blind to a per-channel scale and shift of the pixels, the mirror average (TTA) makes
scores blind to mirroring, and a mirror or a zero-padded crop changes nothing for images it maps onto themselves.
"""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CPU, load_weights, run_main, scalars, script_module
from model import MyModel
from training.datagen import learnable_images

SCRIPTS = ['train.py', 'train_gpu_1.py', 'train_gpu_2.py', 'train_ddp.py']
# the one-process and the distributed script: tests/test_scripts.py keeps the other two's routine the same as train.py's
TWO_SCRIPTS = ['train.py', 'train_ddp.py']
CLASSES = ['a', 'b', 'c']
COUNTS = (6, 3, 3)  # training images per class: unequal, so that label smoothing moves the biases
LR = 0.1
ONE_STEP = ('--batch-size', sum(COUNTS), '--lr', LR, '--precision', 'fp32', '--quiet',
            '--log-interval', 1, '--run-name', 'run')


def noise(n: int, seed: int) -> np.ndarray:
    """n random 32x32 RGB images with even pixel values (so that value / 2 + 64 is a whole number too)."""
    return np.random.default_rng(seed).integers(0, 128, (n, 32, 32, 3), dtype=np.uint8) * 2


def smooth(n: int, seed: int) -> np.ndarray:
    """n random 32x32 RGB pictures of blurry blobs (6x6 noise enlarged): their 5x5 patches vary a lot along smooth
    directions and little along sharp ones, as photographs' do."""
    coarse = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (6, 6 * n, 3), dtype=np.uint8))
    wide = np.asarray(coarse.resize((32 * n, 32), Image.BICUBIC))
    return np.stack(np.split(wide, n, axis=1))


def mirror_symmetric(images: np.ndarray) -> np.ndarray:
    """Each image's left half, mirrored onto its right half: images that a horizontal mirror leaves as they are."""
    return np.concatenate([images[:, :, :16], images[:, :, :16][:, :, ::-1]], axis=2)


def write_folders(root, train: np.ndarray, test: np.ndarray, train_labels=None, test_labels=None):
    """root/train/<class>/*.png and root/test/<class>/*.png (PNG: the pixels come back exactly)."""
    for split, images, labels in (('train', train, train_labels), ('test', test, test_labels)):
        if labels is None:
            labels = np.repeat(np.arange(len(COUNTS)), COUNTS) if split == 'train' else np.arange(len(images)) % 3
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f'{i:03d}.png')
    return root


@pytest.fixture(scope='session')
def folders(tmp_path_factory):
    """Data sets that differ in one respect each, made once: {name: root}."""
    root = tmp_path_factory.mktemp('promises')
    train, test = noise(sum(COUNTS), 1), noise(6, 2)
    return {
        'noise': write_folders(root / 'noise', train, test),
        # the same pictures, each pixel value v as v / 2 + 64: another per-channel scale and shift
        'rescaled': write_folders(root / 'rescaled', train // 2 + 64, test // 2 + 64),
        # the same training images, the test images mirrored
        'mirrored test': write_folders(root / 'mirrored test', train, test[:, :, ::-1].copy()),
        'symmetric': write_folders(root / 'symmetric', mirror_symmetric(train), mirror_symmetric(test)),
        'black': write_folders(root / 'black', np.zeros_like(train), np.zeros_like(test)),
        'smooth': write_folders(root / 'smooth', smooth(sum(COUNTS), 3), smooth(6, 4)),
    }


def device_flags(script: str) -> tuple:
    """--device cpu for the scripts that have the flag (where a GPU would otherwise be taken)."""
    return CPU if script in ('train_gpu_2.py', 'train_ddp.py') else ()


class Trainer:
    """Runs a script in this process on one of the folders, each combination once; returns its checkpoint folder."""

    def __init__(self, folders, root):
        self.folders, self.root, self.done = folders, root, {}

    def __call__(self, script: str, data: str = 'noise', *flags, epochs: int = 1):
        key = (script, data, flags, epochs)
        if key not in self.done:
            work = self.root / f'run{len(self.done)}'
            work.mkdir()
            run_main(script, *ONE_STEP, *device_flags(script), '--data-dir', self.folders[data], '--epochs', epochs, *flags,
                     cwd=work)
            self.done[key] = work
        return self.done[key]


@pytest.fixture(scope='session')
def train(folders, tmp_path_factory):
    return Trainer(folders, tmp_path_factory.mktemp('runs'))


def weights(work, epoch: int = 0) -> dict:
    """model_{epoch}.pth's weights (a bundle's 'model' with --normalize)."""
    saved = load_weights(work / 'model' / f'model_{epoch}.pth')
    return saved['model'] if 'format' in saved else saved


def initial_weights() -> dict:
    """The weights every run starts from: the seed's (--seed 0), as the scripts draw them."""
    torch.manual_seed(0)
    return MyModel(num_classes=len(CLASSES)).state_dict()


def logged(work, tag: str) -> list:
    """The values of one TensorBoard tag of the run in ``work`` (its run folder logs/run), in step order."""
    return [value for _, value in scalars(work / 'logs' / 'run', tag)]


def step(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in before}


def close(a: dict, b: dict, atol: float = 1e-6) -> bool:
    return all(torch.allclose(a[k], b[k], rtol=1e-4, atol=atol) for k in a)


def identical(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def norm(tensors: dict) -> float:
    return math.sqrt(sum(t.double().pow(2).sum().item() for t in tensors.values()))


@pytest.mark.parametrize('script', SCRIPTS)
def test_label_smoothing_moves_the_last_biases_by_the_class_frequencies(script, train):
    """d loss / d bias_k = mean(p_k - target_k); smoothing s puts s/K on every class and 1 - s on the true one,
    so the smoothed step moves bias k by lr * s * (share of class k - 1/K) further than the plain step."""
    w0 = initial_weights()
    plain, smoothed = weights(train(script)), weights(train(script, 'noise', '--label-smoothing', 0.3))
    shift = smoothed['model.8.bias'] - plain['model.8.bias']
    share = torch.tensor(COUNTS) / sum(COUNTS)
    assert torch.allclose(shift, -LR * 0.3 * (share - 1 / len(CLASSES)), atol=1e-6)
    assert not torch.equal(plain['model.8.bias'], w0['model.8.bias'])  # the plain run did step


@pytest.mark.parametrize('script', TWO_SCRIPTS)
def test_weight_decay_pulls_the_weights_toward_zero_but_not_the_biases(script, train):
    w0 = initial_weights()
    plain, decayed = weights(train(script)), weights(train(script, 'noise', '--weight-decay', 0.5))
    for name, start in w0.items():
        pulled = decayed[name] - plain[name]
        if start.dim() > 1:  # convolution kernels and weight matrices: lr * decay * w further toward 0
            assert torch.allclose(pulled, -LR * 0.5 * start, atol=1e-6), name
        else:  # biases: untouched by the decay
            assert torch.allclose(pulled, torch.zeros_like(pulled), atol=1e-7), name


@pytest.mark.parametrize('script', TWO_SCRIPTS)
def test_muon_orthogonalises_the_steps_of_the_kernels_and_first_linear_layer_and_leaves_the_rest_to_sgd(script, train):
    """The plain run's step is -lr * g. With --muon-lr 0.01 each kernel's and the first linear layer's step is
    0.01 times the orthogonal matrix nearest to g (g's few directions, one batch's, each with a singular value
    near 1); the classifier and the biases step as in the plain run; --muon-decay pulls only the weights Muon
    steps, by 0.01 * decay * w further."""
    w0, plain = initial_weights(), weights(train(script))
    muon = weights(train(script, 'noise', '--muon-lr', 0.01))
    decayed = weights(train(script, 'noise', '--muon-lr', 0.01, '--muon-decay', 0.5))
    for name, start in w0.items():
        if name in ('model.0.weight', 'model.2.weight', 'model.4.weight', 'model.7.weight'):
            step, gradient = [((start - w) / lr).reshape(len(start), -1)
                              for w, lr in ((muon[name], 0.01), (plain[name], LR))]
            u, s, vh = torch.linalg.svd(gradient.double(), full_matrices=False)
            rank = int((s > s[0] / 100).sum())  # (one batch of 12 images of 3 classes: few directions)
            values = torch.linalg.svdvals(step)
            assert values[:rank].min() > 0.65 and values[:rank].max() < 1.25 and (values[rank:] < 0.1).all(), name
            nearest = u[:, :rank] @ vh[:rank]
            assert torch.cosine_similarity(nearest.flatten(), step.double().flatten(), dim=0) > 0.97, name
            assert torch.allclose(decayed[name] - muon[name], -0.01 * 0.5 * start, atol=1e-6), name
        else:
            assert torch.allclose(muon[name], plain[name], atol=1e-7) and torch.equal(decayed[name], muon[name]), name


@pytest.mark.parametrize('script', TWO_SCRIPTS)
def test_whitening_takes_the_first_kernels_step_in_whitened_patch_space(script, train, folders):
    """On smooth pictures, --muon-lr 0.01 --whiten-conv1 0.5: the first kernel's step is 0.01 * orth(g P) P, g the
    plain run's gradient and P the matrix last.pth keeps for it (so a resumed run steps with it), a matrix that
    whitens the pictures' patches: P C P is near 1 along their directions of large variance. Every other weight
    steps as with Muon alone."""
    w0, plain = initial_weights(), weights(train(script, 'smooth'))
    muon = weights(train(script, 'smooth', '--muon-lr', 0.01))
    work = train(script, 'smooth', '--muon-lr', 0.01, '--whiten-conv1', 0.5)
    whitened = weights(work)
    kept = [s['whitening'] for s in load_weights(work / 'model' / 'last.pth')['optimizer']['state'].values()
            if 'whitening' in s]
    assert len(kept) == 1
    matrix = kept[0].double()
    pictures = torch.stack([torch.from_numpy(np.array(Image.open(f))) for f in
                            sorted((folders['smooth'] / 'train').glob('*/*.png'))]).permute(0, 3, 1, 2) / 255
    patches = torch.nn.functional.unfold(pictures.double(), 5, padding=2).transpose(1, 2).reshape(-1, 75)
    covariance = torch.cov(patches.T)
    variances = torch.linalg.eigvalsh(covariance)
    assert variances[-1] / variances[-20] > 100  # (the case: directions of very different variance)
    assert torch.allclose(torch.linalg.eigvalsh(matrix @ covariance @ matrix)[-10:], torch.ones(10, dtype=float),
                          atol=0.1)
    gradient = ((w0['model.0.weight'] - plain['model.0.weight']) / LR).reshape(32, -1).double() @ matrix
    moved = ((w0['model.0.weight'] - whitened['model.0.weight']) / 0.01).reshape(32, -1).double()
    step = moved @ torch.linalg.inv(matrix)  # orth(g P), if the step is orth(g P) P
    u, s, vh = torch.linalg.svd(gradient, full_matrices=False)
    rank = int((s > s[0] / 100).sum())
    values = torch.linalg.svdvals(step)
    assert values[:rank].min() > 0.65 and values[:rank].max() < 1.25 and (values[rank:] < 0.1).all()
    assert torch.cosine_similarity((u[:, :rank] @ vh[:rank]).flatten(), step.flatten(), dim=0) > 0.97
    assert not torch.allclose(whitened['model.0.weight'], muon['model.0.weight'], atol=1e-4)
    assert all(torch.allclose(whitened[k], muon[k], atol=1e-7) for k in w0 if k != 'model.0.weight')


@pytest.mark.parametrize('script', TWO_SCRIPTS)
def test_nesterov_and_momentum_change_the_steps_as_defined(script, train):
    """Nesterov's first step is g + momentum * g; plain momentum's first step is plain SGD's, and its second adds
    momentum times the first."""
    w0 = initial_weights()
    plain = weights(train(script))
    nesterov = weights(train(script, 'noise', '--momentum', 0.9, '--nesterov'))
    assert close(step(nesterov, w0), {k: 1.9 * v for k, v in step(plain, w0).items()})

    sgd = [weights(train(script, epochs=2), e) for e in (0, 1)]
    momentum = [weights(train(script, 'noise', '--momentum', 0.9, epochs=2), e) for e in (0, 1)]
    assert close(momentum[0], sgd[0])
    assert close(step(momentum[1], sgd[1]), {k: 0.9 * v for k, v in step(sgd[0], w0).items()})


@pytest.mark.parametrize('script', TWO_SCRIPTS)
def test_gradient_clipping_caps_the_step_length(script, train):
    w0 = initial_weights()
    plain = step(weights(train(script)), w0)
    assert norm(plain) / LR > 0.05 * 10  # the gradient is far longer than the cap: clipping bites
    clipped = step(weights(train(script, 'noise', '--clip-grad', 0.05)), w0)
    assert norm(clipped) == pytest.approx(LR * 0.05, rel=1e-3)  # the step: lr * the norm it is capped at
    assert close(clipped, {k: v * LR * 0.05 / norm(plain) for k, v in plain.items()}, atol=1e-8)  # same direction
    loose = step(weights(train(script, 'noise', '--clip-grad', 1e6)), w0)  # a cap that does not bite
    assert close(loose, plain, atol=1e-8)


@pytest.mark.parametrize('script', TWO_SCRIPTS)
def test_schedules_set_each_steps_learning_rate(script, train):
    """4 epochs of one step: onecycle with --warmup 0.5 warms up over 2 steps (its first at lr / 2); without warmup
    onecycle's second step is at 3/4 of lr, cosine's at (1 + cos(pi / 4)) / 2 of it, both after the same first step."""
    w0 = initial_weights()
    constant = [weights(train(script, epochs=2), e) for e in (0, 1)]
    warm = weights(train(script, 'noise', '--schedule', 'onecycle', '--warmup', 0.5, epochs=4))
    assert close(step(warm, w0), {k: v / 2 for k, v in step(constant[0], w0).items()})
    for schedule, factor in (('onecycle', 0.75), ('cosine', (1 + math.cos(math.pi / 4)) / 2)):
        run = train(script, 'noise', '--schedule', schedule, '--warmup', 0, epochs=4)
        first, second = weights(run, 0), weights(run, 1)
        assert close(first, constant[0])
        assert close(step(second, first), {k: v * factor for k, v in step(constant[1], constant[0]).items()})
        lr = logged(run, 'learning_rate')
        assert lr[:2] == pytest.approx([LR, LR * factor])
    # the whole warm-up curve: up to lr in 2 steps, then down to 0 over the other 2
    lr = logged(train(script, 'noise', '--schedule', 'onecycle', '--warmup', 0.5, epochs=4), 'learning_rate')
    assert lr == pytest.approx([LR / 2, LR, LR, LR / 2])


@pytest.mark.parametrize('script', TWO_SCRIPTS)
@pytest.mark.parametrize('flags, blind_to', [(('--flip',), 'symmetric'), (('--crop-padding', 2), 'black')])
def test_augmentation_changes_what_training_sees(script, flags, blind_to, train):
    """A mirror changes the training images unless they are mirror-symmetric (a vertical flip would change
    those too); a crop of a zero-padded image changes them unless they are black."""
    assert not identical(weights(train(script, 'noise', *flags)), weights(train(script, 'noise')))
    assert identical(weights(train(script, blind_to, *flags)), weights(train(script, blind_to)))


@pytest.mark.parametrize('loader', ['memory', 'stream'])
def test_mirrors_are_drawn_for_half_the_images_and_crops_at_every_offset(loader, tmp_path):
    """What training is given, image by image: each training image is black with one white pixel at row 10,
    column 5; where the pixel went tells the crop offset (-2..2 each way, with --crop-padding 2) and the mirror."""
    from training.batches import make_batches
    from training.data import load_training_data
    from training.settings import training_settings
    images = np.zeros((300, 32, 32, 3), dtype=np.uint8)
    images[:, 10, 5] = 255
    write_folders(tmp_path, images, images[:6], train_labels=np.arange(300) % 3)
    args, _ = training_settings(['--data-dir', str(tmp_path), '--flip', '--crop-padding', '2', '--batch-size', '100',
                                 '--loader', loader], 'train.py', '', epochs=2)
    batches, _ = make_batches(load_training_data(args), args, torch.device('cpu'))
    where = []
    for epoch in (0, 1):
        dots = [(image.sum(0) > 0).nonzero().tolist() for batch, _ in batches.epoch(epoch) for image in batch]
        assert all(len(dot) == 1 for dot in dots)  # each image still holds its one white pixel, and nothing else
        where.append([tuple(dot[0]) for dot in dots])
    for dots in where:
        mirrored = [column >= 16 for _, column in dots]
        assert 0.4 < sum(mirrored) / len(dots) < 0.6
        unmirrored = [(row, 31 - column if flipped else column) for (row, column), flipped in zip(dots, mirrored)]
        assert {(row - 10, column - 5) for row, column in unmirrored} == \
            {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    assert where[0] != where[1]  # new crops and mirrors every epoch


def pixel_stats(root) -> dict:
    """Per-channel mean and standard deviation of a folder's training pictures, in [0, 1], worked out here."""
    pixels = np.stack([np.asarray(Image.open(p)) for p in sorted((root / 'train').rglob('*.png'))]) / 255
    return {'mean': pixels.mean((0, 1, 2)).tolist(), 'std': pixels.std((0, 1, 2), ddof=1).tolist()}


def predictions(*args, cwd) -> list:
    """test.py's JSON predictions: [{class: probability}, ...] per image."""
    out = json.loads(run_main('test.py', *args, '--json', '--top-k', 3, '--device', 'cpu', cwd=cwd).stdout)
    return [{t['class']: t['probability'] for t in p['top']} for p in out['predictions']]


def evaluation(checkpoint, data, *flags, cwd) -> dict:
    return json.loads(run_main('test.py', '--eval', '--json', '--checkpoint', checkpoint, '--data-dir', data,
                               '--device', 'cpu', *flags, cwd=cwd).stdout)


@pytest.mark.parametrize('epochs', [1, 2])
def test_eval_reports_each_class_and_the_most_confident_mistakes_of_its_own_images(epochs, tmp_path):
    """--eval on a test split of 1, 2 and 3 images per class: each class's accuracy over its own images, the
    overall one their weighted mean; the mistakes, most confident first, each named by its file and the top
    class test.py gives that picture."""
    train = noise(sum(COUNTS), 1)  # (the test images are training ones: after 1 step the model gets the
    # single image of class a right, after 2 steps the 3 of class c: the case where per-class sums matter)
    data = write_folders(tmp_path / 'data', train, train[[0, 6, 7, 9, 10, 11]], test_labels=[0, 1, 1, 2, 2, 2])
    run_main('train.py', *ONE_STEP, '--data-dir', data, '--epochs', epochs, '--lr', 0.5, cwd=tmp_path)
    best = tmp_path / 'model' / 'best.pth'
    report = evaluation(best, data, cwd=tmp_path)
    confusion = torch.tensor(report['confusion'])
    assert confusion.diag().tolist() == ([1, 0, 0] if epochs == 1 else [0, 0, 3])
    assert [row['images'] for row in report['per_class']] == [1, 2, 3] == confusion.sum(1).tolist()
    per_class = [row['accuracy'] for row in report['per_class']]
    assert per_class == pytest.approx((confusion.diag() / confusion.sum(1)).tolist())
    assert sum(a * n for a, n in zip(per_class, (1, 2, 3))) / 6 == pytest.approx(report['accuracy'])
    mistakes = report['mistakes']
    assert len(mistakes) == min(6 - confusion.trace().item(), 5)
    assert [m['probability'] for m in mistakes] == sorted((m['probability'] for m in mistakes), reverse=True)
    for m in mistakes:
        seen = predictions(m['file'], '--checkpoint', best, cwd=tmp_path)[0]
        assert m['file'].startswith(str(data / 'test' / m['true'])) and m['predicted'] != m['true']
        assert max(seen, key=seen.get) == m['predicted'] and seen[m['predicted']] == pytest.approx(m['probability'])


@pytest.mark.parametrize('script', TWO_SCRIPTS)
def test_normalisation_makes_training_blind_to_a_scale_and_shift_of_the_pixels(script, train, folders):
    """Pixel values v and v / 2 + 64 normalise to the same inputs: with --normalize the two data sets train
    the same weights, and each checkpoint holds its own data's statistics; without it they do not."""
    same = [train(script, name, '--normalize') for name in ('noise', 'rescaled')]
    assert close(weights(same[0]), weights(same[1]), atol=1e-5)
    assert not close(weights(train(script, 'noise')), weights(train(script, 'rescaled')), atol=1e-5)
    for work, name in zip(same, ('noise', 'rescaled')):
        expected = pixel_stats(folders[name])
        for file in ('model_0.pth', 'best.pth', 'last.pth'):
            saved = load_weights(work / 'model' / file)['normalize']
            assert saved['mean'] == pytest.approx(expected['mean'], abs=1e-6)
            assert saved['std'] == pytest.approx(expected['std'], abs=1e-6)


def test_test_py_normalises_as_training_did(train, folders, tmp_path):
    """The two --normalize checkpoints of the same pictures, each shown its own version of a picture, classify,
    evaluate and explain (Grad-CAM) alike; a checkpoint used without its statistics would not."""
    from training.checkpoint import build_model
    from training.explain import grad_cam
    from training.recipe import Normalize
    runs = {name: train('train.py', name, '--normalize') / 'model' / 'best.pth' for name in ('noise', 'rescaled')}
    picture = {name: folders[name] / 'test' / 'a' / '000.png' for name in runs}
    seen = [predictions(picture[n], '--checkpoint', runs[n], cwd=tmp_path)[0] for n in runs]
    assert seen[0].keys() == seen[1].keys() and all(seen[0][k] == pytest.approx(seen[1][k], abs=1e-5) for k in seen[0])
    reports = [evaluation(runs[n], folders[n], cwd=tmp_path) for n in runs]
    assert reports[0]['accuracy'] == reports[1]['accuracy']
    assert reports[0]['loss'] == pytest.approx(reports[1]['loss'], rel=1e-5)

    cams = []
    for name in runs:
        checkpoint = load_weights(runs[name])
        model = build_model(checkpoint['model'])
        image = script_module('test.py').load_image(picture[name])
        cams.append(grad_cam(model, image, normalize=Normalize(**checkpoint['normalize']))[0])
    unnormalised = grad_cam(model, image, normalize=None)[0]  # the last checkpoint, without its statistics
    assert torch.allclose(cams[0], cams[1], atol=1e-4)
    assert not torch.allclose(cams[1], unnormalised, atol=1e-4)


def test_convert_warns_that_a_normalised_checkpoints_state_dict_loses_its_statistics(train, tmp_path):
    for flags, warned in (((), False), (('--normalize',), True)):
        best = train('train.py', 'noise', *flags) / 'model' / 'best.pth'
        target = tmp_path / f'plain{len(flags)}.pth'
        said = run_main('test.py', '--checkpoint', best, '--convert', target, cwd=tmp_path).stdout
        assert said.startswith(f'converted {best} -> {target}: a plain state_dict') and target.is_file()
        assert ('trained on normalised images' in said and f'keep using {best} with test.py' in said) == warned
        assert said.endswith(f"(torch.load('{target}', weights_only=True) reads it)\n") != warned
        plain = torch.load(target, weights_only=True)
        assert identical(plain, load_weights(best)['model'])  # the weights themselves, in MyModel's keys


@pytest.mark.parametrize('script', SCRIPTS)
def test_tta_makes_the_test_scores_blind_to_mirroring(script, train):
    """The same training, the test pictures mirrored: with --tta the test loss is the same to the last bit."""
    def test_loss(work):
        return logged(work, 'test_loss')[0]
    with_tta = [train(script, name, '--tta') for name in ('noise', 'mirrored test')]
    assert identical(weights(with_tta[0]), weights(with_tta[1]))  # the same training
    assert test_loss(with_tta[0]) == test_loss(with_tta[1])
    assert test_loss(train(script, 'noise')) != test_loss(train(script, 'mirrored test'))


def test_test_py_averages_with_the_mirror_image(train, folders, tmp_path):
    """A --tta checkpoint: test.py classifies a picture and its mirror image alike, evaluates the test split and
    its mirror image alike, and draws the same bars for both in --explain; --no-tta tells them apart."""
    from training.explain import layout
    checkpoint = train('train.py', 'noise', '--tta') / 'model' / 'best.pth'
    pictures = [folders[name] / 'test' / 'a' / '000.png' for name in ('noise', 'mirrored test')]
    for flags, alike in (((), True), (('--no-tta',), False)):
        seen = [predictions(p, '--checkpoint', checkpoint, *flags, cwd=tmp_path)[0] for p in pictures]
        assert (seen[0] == seen[1]) is alike
        reports = [evaluation(checkpoint, folders[name], *flags, cwd=tmp_path) for name in ('noise', 'mirrored test')]
        assert (reports[0]['loss'] == reports[1]['loss']) is alike
        panels = []
        for i, picture in enumerate(pictures):
            run_main('test.py', picture, '--checkpoint', checkpoint, '--explain', tmp_path / f'x{i}', *flags,
                     '--device', 'cpu', cwd=tmp_path)
            panels.append(np.asarray(Image.open(tmp_path / f'x{i}' / '000.explain.png').crop(layout()['bars'])))
        assert np.array_equal(panels[0], panels[1]) is alike


def learnable_folders(root, rotate_test_labels: bool):
    """Images whose class is their colour (learnt in a few steps); with ``rotate_test_labels`` the test split's
    labels are moved on by one class, so that the better the model, the lower its test accuracy."""
    train, train_labels = learnable_images(90, 3, seed=0)
    test, test_labels = learnable_images(30, 3, seed=1)
    test_labels = (np.array(test_labels) + rotate_test_labels) % 3
    return write_folders(root, train, test, train_labels=train_labels, test_labels=test_labels)


@pytest.mark.parametrize('script', SCRIPTS)
def test_best_pth_is_the_best_epoch_when_later_ones_are_worse(script, tmp_path):
    """Two epochs on data where test accuracy rises, then (--resume) two where the test labels are moved on by
    one class, so it falls: best.pth stays epoch 1's, and every checkpoint says which epoch it is and what it
    scored, which test.py --eval confirms on the data that epoch was tested on."""
    data = [learnable_folders(tmp_path / 'right', False), learnable_folders(tmp_path / 'wrong', True)]
    flags = ('--batch-size', 10, '--lr', 0.01, '--precision', 'fp32', '--quiet', '--run-name', 'run',
             *device_flags(script))
    run_main(script, *flags, '--data-dir', data[0], '--epochs', 2, cwd=tmp_path)
    run_main(script, *flags, '--data-dir', data[1], '--epochs', 4, '--resume', cwd=tmp_path)
    accuracy, loss = logged(tmp_path, 'test_accuracy'), logged(tmp_path, 'test_loss')
    assert len(accuracy) == 4 and accuracy[0] < accuracy[1] and max(accuracy[2:]) < accuracy[1]  # the case

    folder = tmp_path / 'model'
    best, last = load_weights(folder / 'best.pth'), load_weights(folder / 'last.pth')
    assert identical(best['model'], weights(tmp_path, 1)) and identical(last['model'], weights(tmp_path, 3))
    for saved, epoch in ((best, 1), (last, 3)):
        assert (saved['epoch'], saved['step']) == (epoch, 9 * (epoch + 1))
        assert saved['test_accuracy'] == pytest.approx(accuracy[epoch]) and saved['classes'] == CLASSES
        assert saved['test_loss'] == pytest.approx(loss[epoch], rel=1e-6) and saved['normalize'] is None
    assert last['best'] == {'accuracy': best['test_accuracy'], 'epoch': 1}
    for name, epoch in (('best.pth', 1), ('last.pth', 3)):
        report = evaluation(folder / name, data[epoch >= 2], cwd=tmp_path)
        assert report['accuracy'] == pytest.approx(accuracy[epoch], abs=1e-6)
        assert report['loss'] == pytest.approx(loss[epoch], rel=1e-5)
    shown = run_main('test.py', data[0] / 'test' / 'a', '--checkpoint', folder / 'best.pth', '--device', 'cpu',
                     cwd=tmp_path).stdout
    assert f'epoch 2, test accuracy {accuracy[1]:.1%}' in shown  # epochs counted from 1 for the learner


def test_the_mirror_average_of_a_mirror_symmetric_image_is_its_own_score():
    from training.recipe import ViewAverage
    torch.manual_seed(0)
    model = MyModel().eval()
    images = torch.from_numpy(mirror_symmetric(noise(2, 3))).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        assert torch.equal(ViewAverage(model)(images), model(images))


@pytest.mark.parametrize('script', SCRIPTS)
def test_each_view_set_gives_its_own_test_loss_and_test_py_scores_with_the_checkpoints_views(script, train, tmp_path):
    """The same training, tested on 2, 3 and 6 views (--tta-views, moved by --tta-shift 1), and on 3 moved
    diagonally (--tta-diagonal): four test losses. test.py --eval of each run's checkpoint (normalised, so a black
    border is not 0) gives that run's own test loss: it takes the views the checkpoint was tested on; a
    checkpoint from before --tta-views (its config without it) on 6 views if it names a --tta-shift, as its run
    tested, and one from before --tta-diagonal moved right and left."""
    views = {2: (2,), 3: (3,), 6: (6,), 'diagonal': (3, '--tta-diagonal')}
    runs = {name: train(script, 'noise', '--tta', '--normalize', '--tta-shift', 1, '--tta-views', *flags)
            for name, flags in views.items()}
    assert all(identical(weights(runs[2]), weights(work)) for work in runs.values())
    losses = {name: logged(work, 'test_loss')[0] for name, work in runs.items()}
    assert len(set(losses.values())) == 4
    for name, work in runs.items():
        checkpoint = work / 'model' / 'best.pth'
        config = load_weights(checkpoint)['config']
        assert (config['tta_views'], config['tta_diagonal']) == (views[name][0], name == 'diagonal')
        assert evaluation(checkpoint, train.folders['noise'], cwd=tmp_path)['loss'] == \
            pytest.approx(losses[name], rel=1e-5)
    for run, key in ((6, 'tta_views'), (3, 'tta_diagonal')):
        older = load_weights(runs[run] / 'model' / 'best.pth')
        del older['config'][key]
        torch.save(older, tmp_path / 'older.pth')
        assert evaluation(tmp_path / 'older.pth', train.folders['noise'], cwd=tmp_path)['loss'] == \
            pytest.approx(losses[run], rel=1e-5)


def test_each_epoch_of_the_history_holds_that_epochs_figures(folders, tmp_path):
    """main()'s Progress (benchmark.py reads its speeds from it): one history entry per epoch with that epoch's
    image counts, losses and accuracies as TensorBoard logged them, and times inside the run's own."""
    import contextlib
    import io
    import time
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        progress = script_module('train.py').main([str(a) for a in (
            *ONE_STEP, '--data-dir', folders['noise'], '--epochs', 3, '--lr', 0.5,
            '--checkpoint-dir', tmp_path / 'model', '--log-dir', tmp_path / 'logs')])
    elapsed = time.perf_counter() - start
    history = progress.history
    assert [h['epoch'] for h in history] == [0, 1, 2] and progress.step == 3
    assert all(h['train_images'] == sum(COUNTS) and h['test_images'] == 6 for h in history)
    assert [h['test_accuracy'] for h in history] == pytest.approx(logged(tmp_path, 'test_accuracy'))
    assert [h['test_loss'] for h in history] == pytest.approx(logged(tmp_path, 'test_loss'))
    assert [h['train_loss'] for h in history] == pytest.approx(logged(tmp_path, 'train_loss'))  # 1 step an epoch
    assert all(h['train_accuracy'] * sum(COUNTS) == pytest.approx(round(h['train_accuracy'] * sum(COUNTS)))
               for h in history)  # a share of the 12 images
    assert len({h['train_loss'] for h in history}) == 3  # each epoch its own figures
    times = [h[f'{loop}_seconds'] for h in history for loop in ('train', 'test')]
    assert all(t > 0 for t in times) and sum(times) < elapsed
    accuracies = [h['test_accuracy'] for h in history]
    assert progress.best == {'accuracy': max(accuracies), 'epoch': accuracies.index(max(accuracies))}


# --explain's panels, each from what it is said to show

def test_the_heat_scale_runs_blue_cyan_yellow_red_and_linearly_between():
    from training.explain import heat_colours
    colours = heat_colours(np.array([0, 1 / 3, 2 / 3, 1])).astype(int)
    blue, cyan, yellow, red = colours
    assert blue[2] > 100 and blue[:2].max() == 0 and red[0] > 200 and red[1:].max() == 0
    assert cyan[0] == 0 and min(cyan[1:]) > 150 and yellow[2] == 0 and min(yellow[:2]) > 200
    between = heat_colours(np.array([1 / 6, 1 / 2, 5 / 6])).astype(int)
    assert np.abs(between - (colours[:-1] + colours[1:]) / 2).max() <= 1
    assert np.array_equal(heat_colours(np.array([-1.0, 2.0])), colours[[0, 3]].astype(np.uint8))  # clipped


@pytest.mark.parametrize('size', [(64, 32), (20, 80), (300, 300), (600, 1), (1, 600)])  # (a line: 1 pixel)
def test_a_picture_is_fitted_into_its_panel_centred_on_white(size):
    from training.explain import PANEL, fit
    panel = np.asarray(fit(Image.new('RGB', size, 'black'))).astype(int)
    width, height = (max(1, round(side * PANEL / max(size))) for side in size)
    left, top = (PANEL - width) // 2, (PANEL - height) // 2
    assert panel.shape == (PANEL, PANEL, 3)
    assert panel[top:top + height, left:left + width].max() == 0  # the picture, scaled to fit
    outside = np.ones((PANEL, PANEL), dtype=bool)
    outside[top:top + height, left:left + width] = False
    assert (panel[outside] == 255).all()


def test_the_model_view_is_each_input_pixel_as_a_square_between_white_lines():
    from training.explain import PANEL, model_view
    image = torch.rand(3, 32, 32)
    view = np.asarray(model_view(image)).astype(int)
    square = PANEL // 32
    lines = np.zeros(PANEL, dtype=bool)
    lines[square::square] = True
    assert (view[lines] == 255).all() and (view[:, lines] == 255).all()
    inside = np.array([i * square + j for i in range(32) for j in range(1, square)])  # clear of the lines
    inside = view[inside][:, inside].reshape(32, square - 1, 32, square - 1, 3)
    expected = (image.permute(1, 2, 0) * 255).round().numpy()
    assert (inside == expected[:, None, :, None]).all()


def test_grad_cam_scales_its_map_to_a_peak_of_1_and_leaves_a_map_without_evidence_at_0():
    from training.explain import grad_cam, last_conv
    torch.manual_seed(0)
    model, image = MyModel(), torch.rand(3, 32, 32)
    cam, target = grad_cam(model, image)
    with torch.no_grad():
        assert target == model(image[None]).argmax().item()
    assert cam.shape == (8, 8) and cam.min() >= 0 and cam.max() == 1
    with torch.no_grad():  # a last convolution that outputs nothing: no evidence anywhere
        last_conv(model).weight.zero_()
        last_conv(model).bias.zero_()
    assert torch.equal(grad_cam(model, image)[0], torch.zeros(8, 8))


def test_the_heat_map_is_half_picture_half_colour():
    from training.explain import PANEL, heat_colours, overlay
    cold = np.asarray(overlay(Image.new('RGB', (40, 20), 'black'), torch.zeros(8, 8))).astype(int)
    hot = np.asarray(overlay(Image.new('RGB', (40, 20), 'white'), torch.ones(8, 8))).astype(int)
    assert cold.shape == hot.shape == (PANEL, PANEL, 3)
    assert np.abs(cold - heat_colours(np.zeros(1))[0] / 2).max() <= 1
    assert np.abs(hot - (255 + heat_colours(np.ones(1))[0].astype(int)) / 2).max() <= 1
    left = np.asarray(overlay(Image.new('RGB', (32, 32)), torch.tensor([[1.0, 0.0]] * 2))).astype(int)
    assert left[:, :PANEL // 4, 0].min() > left[:, -PANEL // 4:, 0].max()  # the map's left half is the hot one


def test_the_bars_are_as_long_as_the_probabilities():
    from training.explain import PANEL, bars
    top = [{'class': 'cat', 'index': 3, 'probability': 0.8}, {'class': 'dog', 'index': 5, 'probability': 0.15},
           {'class': 'frog', 'index': 6, 'probability': 0.0}]
    panel = np.asarray(bars(top)).astype(int)
    row = PANEL // 3
    centres = [panel[i * row + row // 2] for i in range(3)]
    outline = (panel[2 * row + row // 2 - 8] == 200).all(1).nonzero()[0]  # the empty bar's outline: full length
    length = outline.max() - outline.min()  # (its drawn outline is one pixel longer than the bar)
    orange = ((centres[0][:, 0] > 200) & (centres[0][:, 1] < 120)).sum()
    grey = (np.abs(centres[1] - 120) == 0).all(1).sum()
    assert orange == round(0.8 * length) and grey == round(0.15 * length)
    assert not ((centres[2][:, 0] > 200) & (centres[2][:, 1] < 120)).any() and \
        not (np.abs(centres[2] - 120) == 0).all(1).any()  # 0 %: an empty bar
    assert all((c[:90] < 128).any() for c in (panel[i * row + row // 2 - 4:i * row + row // 2 + 6].min(0)
                                              for i in range(3)))  # each bar has its class name left of it


def test_a_single_guess_has_its_bar_in_the_middle():
    from training.explain import PANEL, bars
    panel = np.asarray(bars([{'class': 'cat', 'index': 3, 'probability': 1.0}])).astype(int)
    orange = ((panel[..., 0] > 200) & (panel[..., 1] < 120)).any(1).nonzero()[0]
    assert (orange.min() + orange.max()) / 2 == PANEL // 2  # (rows y - 8 .. y + 8 around the middle, y)


def test_the_figure_is_its_panels_where_layout_says_each_captioned_on_white():
    """explain_figure: each panel as its own function draws it, at its layout() box (which is its size); a dark
    caption above each, the picture's path in grey below them, white everywhere else."""
    from training.explain import MARGIN, PANEL, TITLE, bars, captions, explain_figure, fit, layout, model_view, overlay
    picture, image = Image.new('RGB', (64, 48), 'black'), torch.rand(3, 32, 32)
    cam, top = torch.rand(8, 8), [{'class': 'cat', 'index': 3, 'probability': 0.7},
                                  {'class': 'dog', 'index': 5, 'probability': 0.2}]
    figure = explain_figure(picture, image, cam, top, 'photos/cat.png')
    boxes = layout()
    assert figure.size == (boxes['bars'][2] + MARGIN, MARGIN + TITLE + PANEL + MARGIN + 24)
    pixels = np.asarray(figure).astype(int)
    blank = np.ones(pixels.shape[:2], dtype=bool)
    for name, panel in {'picture': fit(picture), 'model_view': model_view(image), 'grad_cam': overlay(picture, cam),
                        'bars': bars(top)}.items():
        left, top_edge, right, bottom = boxes[name]
        assert (right - left, bottom - top_edge) == panel.size
        assert np.array_equal(pixels[top_edge:bottom, left:right], np.asarray(panel))
        caption = pixels[MARGIN:top_edge, left:right]
        assert caption.max(2).min() < 60  # dark text, over the panel's own column
        blank[top_edge:bottom, left:right] = blank[MARGIN:top_edge, left:right] = False
    footer = pixels[boxes['bars'][3]:]
    assert footer.min() == 80 and (footer.max(2) == footer.min(2)).all()  # grey text
    blank[boxes['bars'][3]:] = False
    assert (pixels[blank] == 255).all() and (pixels[-1] == 255).all()  # the path is not cut off at the bottom
    lines = captions(picture, image, top)
    assert lines['picture'] == 'your picture (64x48)' and '32x32 pixels' in lines['model_view']
    assert '"cat"' in lines['grad_cam'] and 'dog' not in lines['grad_cam'] and lines['bars'] == 'top 2 guesses'


def test_explain_draws_the_heat_map_of_the_normalised_input_into_a_new_nested_folder(train, folders, tmp_path):
    """test.py --explain with a --normalize checkpoint: its Grad-CAM panel is the map of the picture normalised
    as in training (not of the raw pixels), in DIR/ made with the folders above it."""
    from training.checkpoint import build_model
    from training.explain import grad_cam, layout, overlay
    from training.recipe import Normalize
    best = train('train.py', 'noise', '--normalize') / 'model' / 'best.pth'
    photo = folders['noise'] / 'test' / 'a' / '000.png'
    run_main('test.py', photo, '--checkpoint', best, '--explain', tmp_path / 'out' / 'why', cwd=tmp_path)
    panel = np.asarray(Image.open(tmp_path / 'out' / 'why' / '000.explain.png').crop(layout()['grad_cam'])).astype(int)
    checkpoint = load_weights(best)
    model, image = build_model(checkpoint['model']), script_module('test.py').load_image(photo)
    picture = Image.open(photo).convert('RGB')
    for normalize, drawn in ((Normalize(**checkpoint['normalize']), True), (None, False)):
        expected = np.asarray(overlay(picture, grad_cam(model, image, normalize=normalize)[0])).astype(int)
        assert (np.abs(panel - expected).max() <= 1) == drawn


def test_the_normalisation_statistics_come_from_the_same_images_whatever_the_seed():
    from training.recipe import STATS_SAMPLE, stats_sample
    torch.manual_seed(1)
    first = stats_sample(3 * STATS_SAMPLE)
    torch.manual_seed(2)
    assert torch.equal(stats_sample(3 * STATS_SAMPLE), first) and len(first.unique()) == STATS_SAMPLE
    assert torch.equal(first, first.sort().values)  # in the data set's order
    assert torch.equal(stats_sample(50), torch.arange(50))  # a small data set: all of it


@pytest.mark.parametrize('own_folders', [False, True])
def test_the_printed_resume_command_continues_the_run(own_folders, folders, tmp_path, interrupter):
    """Ctrl+C after step 2 of 4: the command the run prints, pasted, ends with the uninterrupted run's weights;
    it names --checkpoint-dir and --data-dir only when they are not the project's own model/ and dataset/."""
    import shlex
    import shutil
    where = ('--checkpoint-dir', 'my runs', '--data-dir', folders['noise']) if own_folders else ()
    if not own_folders:
        shutil.copytree(folders['noise'], tmp_path / 'dataset')
    flags = ('--batch-size', 4, '--lr', LR, '--precision', 'fp32', '--quiet', '--epochs', 2)
    stopped = interrupter.run('train.py', *flags, *where, cwd=tmp_path, at=[2])
    assert stopped.returncode == 130
    command = shlex.split(stopped.stderr.strip().splitlines()[-1].split('continue with: ')[1])
    assert command[:3] == ['python', 'train.py', '--resume']
    assert command[3:] == [str(a) for a in where]
    run_main('train.py', *command[2:], cwd=tmp_path)
    run_main('train.py', *flags, '--data-dir', folders['noise'], '--checkpoint-dir', 'reference', cwd=tmp_path)
    resumed = load_weights(tmp_path / ('my runs' if own_folders else 'model') / 'model_1.pth')
    assert identical(resumed, load_weights(tmp_path / 'reference' / 'model_1.pth'))


def test_an_epoch_only_as_good_as_the_best_leaves_best_pth_alone(train):
    """Black pictures: every epoch scores the same, so best.pth stays the first epoch's."""
    work = train('train.py', 'black', epochs=3)
    accuracy = logged(work, 'test_accuracy')
    assert len(set(accuracy)) == 1 and load_weights(work / 'model' / 'best.pth')['epoch'] == 0
    assert not identical(weights(work, 0), weights(work, 2))  # (the weights did change)


@pytest.mark.parametrize('steps', [3, 1])
def test_a_mid_epoch_meter_saved_by_an_earlier_version_continues_per_image(steps):
    """Earlier last.pth files kept the window as a sum of per-step means over 'window_steps' steps of 16 images."""
    from training.meters import TrainMeter
    old = {'loss_sum': 32.0 * steps, 'correct': 5, 'seen': 16 * steps, 'batches': steps, 'window_sum': 4.0,
           'window_steps': min(steps, 2)}
    meter = TrainMeter('cpu', old)
    meter.add(torch.tensor(1.0), torch.zeros(16, 3), torch.zeros(16, dtype=torch.long))
    window = min(steps, 2) * 16  # images
    assert meter.window_loss(4) == pytest.approx((4.0 * 16 + 16) / (window + 16))  # per image, old steps and new
    result = meter.result(4)
    assert result.loss == pytest.approx((32 * steps + 16) / (16 * steps + 16)) and result.images == 16 * steps + 16
