"""--recipe fast: its ingredients one by one, and a real run whose checkpoints test.py uses as trained."""
import json
import math
import sys
from argparse import Namespace

import pytest
from PIL import Image
import torch
from torch import nn

from conftest import CLASSES, CPU, ROOT, fails_cleanly, load_weights, run_main, scalars, script_module
from model import MyModel
from training.data import CIFAR10  # torchvision's loader, without the MD5 check of the official files
from training.recipe import (RECIPES, WHITENING_FLOOR, ByLength, Muon, Normalize, ViewAverage, channel_stats,
                             inference_net, lr_schedule, make_optimizer, orthogonalize, patch_whitening)
from training.settings import training_settings

CPU_DEVICE = torch.device('cpu')

FAST = ('--recipe', 'fast', '--epochs', 2, '--tta-shift', 1,  # the views of a run of 5 epochs or more
        '--batch-size', 16, '--lr', 0.02,  # 0.05 is for batches of 128
        '--log-interval', 5, '--precision', 'fp32')


def parse(*argv):
    return training_settings([str(a) for a in argv], 'train.py', '', epochs=10)[0]


def test_the_default_recipe_is_still_the_tutorials():
    args = parse()
    assert (args.recipe, args.batch_size, args.lr, args.momentum, args.weight_decay) == ('tutorial', 64, 0.01, 0, 0)
    assert not (args.nesterov or args.normalize or args.flip or args.crop_padding or args.tta)
    assert (args.schedule, args.label_smoothing) == ('constant', 0)


def test_a_recipe_fills_only_the_flags_not_given():
    args = parse('--recipe', 'fast', '--lr', 0.02, '--no-flip', '--crop-padding', 0)
    assert (args.lr, args.flip, args.crop_padding) == (0.02, False, 0)
    assert {k: getattr(args, k) for k in RECIPES['fast'] if k not in ('lr', 'flip', 'crop_padding')} == \
        {k: v(args) if callable(v) else v for k, v in RECIPES['fast'].items()
         if k not in ('lr', 'flip', 'crop_padding')}
    assert parse('--momentum', 0.9, '--nesterov').nesterov  # an ingredient on its own, tutorial otherwise


def test_fast_crops_by_3_pixels_in_long_runs_by_1_in_short_ones_and_not_in_the_shortest():
    assert [parse('--recipe', 'fast', '--epochs', e).crop_padding for e in (1, 4, 5, 14, 15, 30)] == [0, 0, 1, 1, 3, 3]
    assert parse('--recipe', 'fast', '--epochs', 3, '--crop-padding', 2).crop_padding == 2  # a flag given wins


def test_fast_mirrors_each_image_every_other_epoch_in_runs_of_5_to_14_epochs():
    """Measured at 5 epochs (a gain) and 3 (a loss); at random elsewhere."""
    assert [parse('--recipe', 'fast', '--epochs', e).alternate_flip for e in (1, 4, 5, 14, 15, 30)] == \
        [False, False, True, True, False, False]
    assert parse('--recipe', 'fast', '--epochs', 30, '--alternate-flip').alternate_flip  # a flag given wins
    assert not parse('--recipe', 'fast', '--epochs', 5, '--no-alternate-flip').alternate_flip
    from training.cli import training_parser
    assert 'fast: off from 15 epochs on, on from 5 epochs on, off below)' in ' '.join(
        training_parser('train.py', '', 10).format_help().split())


def test_fast_whitens_the_first_kernels_steps_in_runs_under_15_epochs_wherever_muon_steps_it():
    """Measured: +0.14 points after 5 epochs (12 seeds), -0.18 after 30 (one seed): 0.35 below 15 epochs, 0 from
    there. --whiten-conv1 shapes Muon's steps: nothing once --muon-lr 0 turns Muon off (not an error: that flag
    alone asked for SGD); given with --muon-lr 0 it is one (tests/test_robustness.py)."""
    assert [parse('--recipe', 'fast', '--epochs', e).whiten_conv1 for e in (1, 3, 5, 14, 15, 30)] == \
        [0.35, 0.35, 0.35, 0.35, 0, 0]
    assert parse('--recipe', 'fast', '--muon-lr', 0).whiten_conv1 == 0
    assert parse('--recipe', 'fast', '--whiten-conv1', 0.5).whiten_conv1 == 0.5  # a flag given wins
    assert parse('--muon-lr', 0.02, '--whiten-conv1', 0.25).whiten_conv1 == 0.25  # tutorial + two ingredients
    assert parse().whiten_conv1 == 0
    from training.cli import training_parser
    assert '(tutorial: 0.0, fast: 0.0 from 15 epochs on, 0.35 below; 0 without Muon)' in ' '.join(
        training_parser('train.py', '', 10).format_help().split())
    from training.console import describe_recipe
    assert 'Muon for the kernels and first linear layer (lr 0.02, decay 0.05, the first kernel\'s steps whitened ' \
           'to the power 0.35)' in describe_recipe(parse('--recipe', 'fast', '--epochs', 5))


def test_fast_tests_on_the_image_and_its_mirror_image_moved_a_pixel_right_and_left_where_it_trains_on_crops():
    """3 views (measured: +0.4 points after 5 epochs for one more pass over the test images) from 5 epochs on,
    where the crops start; the image and its mirror image alone below (moved views cost a 3-epoch run a point).
    6 views stay a flag (13 % more time per epoch)."""
    for epochs, shift in ((3, 0), (4, 0), (5, 1), (15, 1), (30, 1)):
        args = parse('--recipe', 'fast', '--epochs', epochs)
        assert args.tta and (args.tta_views, args.tta_shift) == (3, shift)
        assert bool(args.tta_shift) == bool(args.crop_padding)
    assert (parse('--tta', '--tta-views', 6).tta_views, parse('--tta').tta_views) == (6, 2)  # tutorial: 2
    assert parse('--recipe', 'fast', '--tta-shift', 2).tta_shift == 2  # a flag given wins


def test_fast_moves_the_mirror_image_diagonally_where_it_moves_it():
    """Measured on the held-out split after 5 and 30 epochs: right and down, left and up, for the same 3 views'
    cost, from 5 epochs on (shorter runs move nothing)."""
    for epochs in (1, 4, 5, 14, 15, 30):
        args = parse('--recipe', 'fast', '--epochs', epochs)
        assert args.tta_diagonal == bool(args.tta_shift) == (epochs >= 5)
    assert not parse('--tta', '--tta-views', 3, '--tta-shift', 1).tta_diagonal  # the tutorial's: right and left
    assert not parse('--recipe', 'fast', '--epochs', 30, '--no-tta-diagonal').tta_diagonal  # a flag given wins
    from training.console import describe_recipe
    assert 'tested on the image and its mirror image moved 1 px right and down, and left and up (TTA)' in \
        describe_recipe(parse('--recipe', 'fast', '--epochs', 5))
    assert 'moved 1 px right and left (TTA)' in describe_recipe(parse('--recipe', 'fast', '--epochs', 30,
                                                                      '--no-tta-diagonal'))


def test_older_checkpoints_views_are_the_ones_their_runs_tested_on():
    from training.recipe import Views, saved_views
    assert Views.saved({'tta': True, 'tta_shift': 2}) == Views(6, 2, False)  # before --tta-views and --tta-diagonal
    assert Views.saved({'tta_views': 3, 'tta_shift': 1, 'tta_diagonal': True}) == Views(3, 1, True)
    assert saved_views({'tta': True, 'tta_shift': 2}) == 6 and saved_views({'tta': True, 'tta_shift': 0}) == 2
    assert saved_views({}) == 2 and saved_views({'tta_views': 3, 'tta_shift': 1}) == 3


def test_a_default_that_depends_on_the_length_of_the_run_says_so_in_the_help():
    default = ByLength('light', 'strong', epochs=15)
    assert [default(Namespace(epochs=e)) for e in (1, 14, 15, 30)] == ['light', 'light', 'strong', 'strong']
    assert str(default) == 'strong from 15 epochs on, light below'
    three = ByLength(ByLength('none', 'light', epochs=5), 'strong', epochs=15)
    assert [three(Namespace(epochs=e)) for e in (1, 4, 5, 14, 15, 30)] == ['none', 'none', 'light', 'light',
                                                                            'strong', 'strong']
    assert str(three) == 'strong from 15 epochs on, light from 5 epochs on, none below'


@pytest.mark.parametrize('argv, fragments', [
    (['--nesterov'], ['--nesterov', 'momentum']),
    (['--warmup', '1'], ['--warmup', 'less than 1']),
    (['--label-smoothing', '-0.1'], ['--label-smoothing']),
    (['--momentum', '-1'], ['--momentum', '>= 0']),
    (['--weight-decay', 'x'], ['--weight-decay', 'number']),
    (['--recipe', 'best'], ['--recipe']),
    (['--schedule', 'step'], ['--schedule']),
])
def test_bad_recipe_flags(argv, fragments, tmp_path):
    fails_cleanly('train.py', argv, tmp_path, *fragments)


def test_val_size_larger_than_the_training_set(cifar_dir, tmp_path):
    fails_cleanly('train.py', ['--data-dir', cifar_dir, '--checkpoint-dir', tmp_path, '--val-size', 1000], tmp_path,
                  '--val-size 1000', 'only 1000')


@pytest.mark.parametrize('schedule', ['onecycle', 'cosine'])
def test_schedules_warm_up_to_the_peak_then_fall_to_zero(schedule):
    lr_at = lr_schedule(Namespace(schedule=schedule, lr=0.05, warmup=0.2), total_steps=100)
    rates = [lr_at(step) for step in range(100)]
    assert rates[:20] == pytest.approx([0.05 * (s + 1) / 20 for s in range(20)])
    assert max(rates) == pytest.approx(0.05) and rates.index(max(rates)) in (19, 20)
    assert all(a >= b for a, b in zip(rates[20:], rates[21:])) and rates[-1] < 0.003
    constant = lr_schedule(Namespace(schedule='constant', lr=0.05, warmup=0.0), 100)
    assert [constant(step) for step in range(100)] == [0.05] * 100


@pytest.mark.parametrize('schedule, fallen', [('onecycle', 1 - 0.5 / 1.5), ('cosine', 0.5 * (1 + math.cos(math.pi / 3)))])
def test_a_warm_up_that_ends_between_two_steps_peaks_at_lr_and_then_falls_from_there(schedule, fallen):
    lr_at = lr_schedule(Namespace(schedule=schedule, lr=0.05, warmup=0.7), total_steps=5)  # warm-up: 3.5 steps
    rates = [lr_at(step) for step in range(6)]  # (step 5: where the run ends)
    assert rates == pytest.approx([0.05 / 3.5, 0.05 * 2 / 3.5, 0.05 * 3 / 3.5, 0.05, 0.05 * fallen, 0])


def test_weight_decay_shrinks_weights_but_not_biases():
    model = MyModel()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    make_optimizer(model, Namespace(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, muon_lr=0)).step()
    for name, p in model.named_parameters():
        if name.endswith('bias'):
            assert torch.equal(p, before[name]), name
        else:  # zero gradient: the step is the decay alone, lr * (1 + momentum) * wd * w with Nesterov
            assert torch.allclose(p, before[name] * (1 - 0.1 * 1.9 * 0.01)), name


MUON = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, muon_lr=0.02, muon_decay=0.05, whiten_conv1=0)


def angle_to_nearest_orthogonal(step: torch.Tensor, matrix: torch.Tensor) -> float:
    """The cosine between ``step`` and U V^T, the orthogonal matrix nearest to ``matrix`` (from its SVD)."""
    u, _, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return torch.nn.functional.cosine_similarity((u @ vh).flatten(), step.double().flatten(), dim=0).item()


SHAPES = [(32, 75), (64, 800), (64, 1024), (75, 32), (10, 10)]


def badly_scaled(shape, seed: int) -> torch.Tensor:
    """A random matrix whose singular values run from 7 down to 7/100."""
    torch.manual_seed(seed)
    u, _, vh = torch.linalg.svd(torch.randn(shape), full_matrices=False)
    return 7.0 * u @ torch.diag(torch.logspace(0, -2, min(shape))) @ vh


def test_orthogonalize_sets_every_singular_value_near_1_and_keeps_the_singular_vectors():
    matrices = [badly_scaled(shape, seed) for seed, shape in enumerate(SHAPES)]
    for matrix, result in zip(matrices, orthogonalize(matrices)):  # all at once: squares of 10 to 64 padded
        values = torch.linalg.svdvals(result)
        assert result.shape == matrix.shape and values.min() > 0.65 and values.max() < 1.25, values
        assert angle_to_nearest_orthogonal(result, matrix) > 0.97


def test_orthogonalize_gives_each_matrix_what_it_gives_it_alone():
    """The zero padding to the largest square changes nothing: batched, each result is the one alone."""
    matrices = [badly_scaled(shape, seed) for seed, shape in enumerate(SHAPES)]
    for matrix, result in zip(matrices, orthogonalize(matrices)):
        (alone,) = orthogonalize([matrix])
        torch.testing.assert_close(result, alone, rtol=1e-4, atol=1e-5)


def test_muon_steps_as_sgd_where_it_does_not_orthogonalise():
    """Groups without ``muon``: torch.optim.SGD's rule (momentum, Nesterov, weight decay), step after step."""
    torch.manual_seed(0)
    ours, theirs = MyModel(), MyModel()
    theirs.load_state_dict(ours.state_dict())
    optimizers = {ours: Muon([{'params': ours.parameters(), 'weight_decay': 5e-4}], lr=0.1, momentum=0.9,
                             nesterov=True),
                  theirs: torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)}
    for _ in range(3):
        images = torch.randn(2, 3, 32, 32)
        for model, optimizer in optimizers.items():
            optimizer.zero_grad()
            model(images).square().mean().backward()
            optimizer.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert type(make_optimizer(MyModel(), Namespace(**{**MUON, 'muon_lr': 0}))) is torch.optim.SGD  # --muon-lr 0


def one_muon_step(model, settings, found_inf=None, grad_scale=None):
    optimizer = make_optimizer(model, settings)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * (1.0 if grad_scale is None else grad_scale)
    gradients = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.found_inf, optimizer.grad_scale = found_inf, grad_scale
    optimizer.step()
    return optimizer, gradients


def test_muon_orthogonalises_the_steps_of_every_weight_but_the_last_layers():
    torch.manual_seed(0)
    model = MyModel()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, gradients = one_muon_step(model, Namespace(**MUON))
    for name, p in model.named_parameters():
        moved = before[name] - p.detach()
        if name in ('model.0.weight', 'model.2.weight', 'model.4.weight', 'model.7.weight'):
            # lr 0.02 for an orthogonal step, then the decay: lr * 0.05 of the weights
            step = (moved - 0.02 * 0.05 * before[name]) / 0.02
            rows = step.reshape(len(step), -1)
            values = torch.linalg.svdvals(rows)
            assert values.min() > 0.65 and values.max() < 1.25, name
            assert angle_to_nearest_orthogonal(rows, gradients[name].reshape(len(step), -1)) > 0.97, name
        else:  # the classifier and the biases: SGD's first Nesterov step, (1 + momentum) * lr * (g + decay * w)
            decay = 5e-4 if name == 'model.8.weight' else 0.0
            expected = 1.9 * 0.1 * (gradients[name] + decay * before[name])
            assert torch.allclose(moved, expected, rtol=1e-4, atol=1e-7), name


def test_muon_under_fp16_skips_an_overflowed_step_and_unscales_the_others():
    """What GradScaler hands an optimizer that takes its overflow flag: nothing moves when it is set, and a
    step of gradients scaled by 1024 with grad_scale 1024 is the unscaled one."""
    torch.manual_seed(0)
    model = MyModel()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer, _ = one_muon_step(model, Namespace(**MUON), found_inf=torch.tensor(1.0))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(not state['momentum_buffer'].any() for state in optimizer.state.values())
    steps = []
    for scale in (None, torch.tensor(1024.0)):
        torch.manual_seed(1)  # the same gradients
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(before[n])
        one_muon_step(model, Namespace(**MUON), found_inf=torch.tensor(0.0), grad_scale=scale)
        steps.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert all(torch.allclose(steps[0][n], steps[1][n], rtol=1e-5, atol=1e-7) for n in before)
    assert not torch.equal(steps[0]['model.0.weight'], before['model.0.weight'])


def smooth_images(n: int, seed: int) -> torch.Tensor:
    """n random N x 3 x 32 x 32 pictures of blurry blobs: their 5x5 patches vary a lot along smooth directions and
    little along sharp ones, as photographs' do."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=generator, dtype=torch.float64)
    return nn.functional.interpolate(coarse, size=32, mode='bicubic', align_corners=False)


def patches_by_hand(images: torch.Tensor) -> torch.Tensor:
    """The 5x5 patches (padding 2) at every place, each as a kernel's entries are ordered."""
    padded = nn.functional.pad(images, (2, 2, 2, 2))
    return torch.stack([padded[:, :, r:r + 5, c:c + 5].reshape(len(images), -1)
                        for r in range(32) for c in range(32)], 1).reshape(-1, 75)


def test_patch_whitening_whitens_every_direction_of_the_patches_above_the_floor():
    """P = patch_whitening(images, conv1, 0.5): P C P, C the patches' covariance, has eigenvalue 1 in every
    direction whose variance is far above the floor (WHITENING_FLOOR of the mean) and less than 1 in the others;
    power 0 leaves the steps alone (P = 1); powers add up (P(a) P(b) = P(a + b))."""
    images, conv = smooth_images(40, 0), MyModel().model[0]
    covariance = torch.cov(patches_by_hand(images).T, correction=0)
    variances = torch.linalg.eigvalsh(covariance)
    assert variances[-1] / variances[0] > 1e5  # (the case: directions that vary over orders of magnitude)
    whitening = patch_whitening(images, conv, 0.5).double()
    assert torch.allclose(whitening, whitening.T, atol=1e-6)
    whitened = torch.linalg.eigvalsh(whitening @ covariance @ whitening)
    floor = WHITENING_FLOOR * variances.mean()
    far_above = int((variances > 100 * floor).sum())
    assert 5 < far_above < 70
    assert torch.allclose(whitened[-far_above:], torch.ones(far_above, dtype=torch.float64), atol=0.02)
    assert (whitened < 1.001).all() and (whitened[:-far_above] < 0.99).all()
    assert torch.allclose(patch_whitening(images, conv, 0.0), torch.eye(75), atol=1e-5)
    quarter = patch_whitening(images, conv, 0.25).double()
    assert torch.allclose(quarter @ quarter, whitening, rtol=1e-3, atol=1e-3)


def test_whitened_muon_steps_the_kernel_as_muon_steps_it_in_whitened_patch_space():
    """A kernel W whose Muon state holds a whitening matrix P steps as W = V P does when plain Muon steps V (V
    sees the patches multiplied by P): the same weights after steps of momentum, Nesterov and weight decay, and
    not those of plain Muon on W."""
    images, conv = smooth_images(24, 1), MyModel().model[0]
    whitening = patch_whitening(images.float(), conv, 0.5).double()
    start = conv.weight.detach().double()
    kernel = nn.Parameter(start.clone())
    inner = nn.Parameter((kernel.detach().reshape(32, -1) @ torch.linalg.inv(whitening)).view_as(kernel))
    plain = nn.Parameter(kernel.detach().clone())
    muon = dict(lr=0.1, momentum=0.9, nesterov=True)
    optimizers = {name: Muon([{'params': [p], 'muon': True, 'weight_decay': 0.05, 'scale': 0.2}], **muon)
                  for name, p in (('whitened', kernel), ('inner', inner), ('plain', plain))}
    optimizers['whitened'].state[kernel]['whitening'] = whitening
    used = {'whitened': lambda: kernel, 'inner': lambda: (inner.reshape(32, -1) @ whitening).view_as(inner),
            'plain': lambda: plain}
    generator = torch.Generator().manual_seed(2)
    for batch in images.split(8):
        target = torch.randn(len(batch), 32, 32, 32, generator=generator, dtype=torch.float64)
        for name, optimizer in optimizers.items():
            optimizer.zero_grad()
            nn.functional.conv2d(batch, used[name](), padding=2).sub(target).square().mean().backward()
            optimizer.step()
    assert torch.allclose(kernel, used['inner'](), rtol=1e-6, atol=1e-9)
    assert (kernel - plain).norm() > 0.1 * (plain - start).norm()


def test_the_first_kernel_alone_steps_whitened_and_its_matrix_comes_from_the_training_images():
    """make_optimizer with --whiten-conv1: the first kernel's Muon state holds patch_whitening of the (normalised)
    training images, every other weight none; a run of the tutorial's SGD cannot take it (Muon's steps only)."""
    from training.batches import TensorBatches
    pictures = (smooth_images(30, 3) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    batches = TensorBatches(pictures, torch.zeros(30, dtype=torch.long), 10, CPU_DEVICE)
    stats = channel_stats(batches.images_at(torch.arange(30)))
    batches.set_normalization(stats, CPU_DEVICE)
    model = MyModel()
    optimizer = make_optimizer(model, Namespace(**{**MUON, 'whiten_conv1': 0.3}), batches)
    kept = {name: 'whitening' in optimizer.state[p] for name, p in model.named_parameters()}
    assert kept == {name: name == 'model.0.weight' for name in kept}
    normalised = Normalize(**stats)(pictures.permute(0, 3, 1, 2).float() / 255)  # all 30: under the sample size
    assert torch.allclose(optimizer.state[model.model[0].weight]['whitening'],
                          patch_whitening(normalised, model.model[0], 0.3), rtol=1e-4, atol=1e-5)
    assert not make_optimizer(MyModel(), Namespace(**{**MUON, 'whiten_conv1': 0}), batches).state  # off: no state


def test_every_process_of_a_distributed_run_whitens_with_the_same_matrix():
    """train_ddp.py: each process builds its own optimizer, so each computes P; P comes from the whole training set
    (not the process's share of each batch) on the CPU, so rank 0 and rank 1 get the same matrix bit for bit --
    else their weights would drift apart step by step."""
    from training.batches import TensorBatches
    from training.recipe import first_layer_whitening
    pictures = (smooth_images(30, 4) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    matrices = []
    for rank in (0, 1):
        batches = TensorBatches(pictures, torch.zeros(30, dtype=torch.long), 10, CPU_DEVICE)
        batches.share_with(Namespace(rank=rank, world_size=2))
        assert batches.mine(0) == ((0, 5) if rank == 0 else (5, 10))  # (the case: each process its own half)
        matrices.append(first_layer_whitening(batches, MyModel().model[0], 0.35))
    assert torch.equal(matrices[0], matrices[1])


def test_normalisation_statistics_and_module():
    images = torch.rand(200, 3, 8, 8) * torch.tensor([0.5, 1.0, 0.2]).view(1, 3, 1, 1)
    stats = channel_stats(images)
    normalised = Normalize(**stats)(images)
    assert normalised.mean((0, 2, 3)).abs().max() < 1e-5
    assert (normalised.std((0, 2, 3)) - 1).abs().max() < 1e-4


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    model, images = MyModel().eval(), torch.rand(4, 3, 32, 32)
    expected = (model(images) + model(torch.flip(images, [3]))) / 2
    assert torch.allclose(ViewAverage(model)(images), expected)
    assert inference_net(model) is model  # the tutorial's checkpoints: nothing added


@pytest.mark.parametrize('diagonal', [False, True])
@pytest.mark.parametrize('shift', [1, 2])
@pytest.mark.parametrize('views', [3, 6])
def test_shifted_views_are_what_the_training_crops_show(views, shift, diagonal):
    """--tta-views' views: the image and its mirror image, moved `shift` pixels right and left (3: the mirror
    image alone moved; 6: both), are crops and mirrors training makes of the image padded by `shift` (an offset
    of 0 or 2 * shift, the middle row); --tta-diagonal moves them down as far as right (the row's offset as the
    column's, before the mirror); --tta-shift 0 leaves the image and its mirror image."""
    from training.recipe import Views, augment, test_time_views
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    got = test_time_views(images.permute(0, 3, 1, 2).float(), Views(views, shift, diagonal))
    s = 2 * shift  # (row, column, mirror) of each view's crop; the mirror of a crop at 2 * shift: moved right
    offsets = {3: ((shift, shift, 0), (0, s, 1), (s, 0, 1)),
               6: ((shift, shift, 0), (shift, shift, 1), (0, 0, 0), (s, 0, 1), (s, s, 0), (0, s, 1))}[views]
    crops = [augment(images, torch.tensor([[row if diagonal else shift, column, mirror]] * 3), shift)
             .permute(0, 3, 1, 2).float() for row, column, mirror in offsets]
    assert len(got) == views
    for view, crop in zip(got, crops):
        assert torch.equal(view, crop)
    for moves in (True, False):
        unmoved = test_time_views(images.permute(0, 3, 1, 2).float(), Views(views, 0, moves))
        assert len(unmoved) == 2 and torch.equal(unmoved[1], images.permute(0, 3, 1, 2).float().flip(3))


@pytest.mark.parametrize('diagonal', [False, True])
@pytest.mark.parametrize('views', [3, 6])
def test_shifted_views_of_normalised_batches_score_as_test_py_scores_the_pictures(views, diagonal):
    """The scripts test normalised batches, on the views their settings ask for, and fill the uncovered columns
    with a black pixel as normalised (Batches.black); test.py moves the pictures themselves, on the views a
    checkpoint's config names, and normalises after: the same scores."""
    from training.batches import TensorBatches
    from training.recipe import Views, test_time_average
    torch.manual_seed(0)
    model, pictures = MyModel().eval(), torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    stats = {'mean': [0.5, 0.4, 0.3], 'std': [0.2, 0.25, 0.3]}
    batches = TensorBatches(pictures, torch.zeros(5, dtype=torch.long), 5, CPU_DEVICE, channels_last=False)
    batches.set_normalization(stats, CPU_DEVICE)
    (images, _), = list(batches)
    settings = parse('--tta', '--tta-views', views, '--tta-shift', 1, '--tta-diagonal' if diagonal else '--tta')
    saved = Views.saved({'tta': True, 'tta_views': views, 'tta_shift': 1, 'tta_diagonal': diagonal})
    with torch.no_grad():
        in_the_scripts = test_time_average(model, images, model(images), settings, batches.black)
        in_test_py = inference_net(model, stats, saved)(pictures.permute(0, 3, 1, 2).float() / 255)
        plain_black = test_time_average(model, images, model(images), settings, 0.0)
    assert torch.allclose(in_the_scripts, in_test_py, atol=1e-5)
    assert not torch.allclose(plain_black, in_test_py, atol=1e-3)  # (the case: black is not 0 once normalised)


@pytest.fixture(scope='session')
def fast_run(cifar_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp('fast')
    return work, run_main('train_gpu_2.py', *FAST, '--data-dir', cifar_dir, *CPU, '--run-name', 'run', cwd=work)


def test_fast_run_saves_the_normalisation_in_every_checkpoint(fast_run, cifar_dir):
    work, result = fast_run
    assert ('recipe fast: SGD momentum 0.9 (Nesterov), weight decay 0.0005, Muon for the kernels and first linear '
            "layer (lr 0.02, decay 0.05, the first kernel's steps whitened to the power 0.35), onecycle schedule") \
        in result.stdout
    train = CIFAR10(str(cifar_dir), train=True)  # 1,000 images: the statistics use all
    pixels = torch.from_numpy(train.data).double().div(255)  # training divides in float32: equal to ~1e-8
    for name in ('model_0.pth', 'model_1.pth', 'best.pth', 'last.pth'):
        bundle = load_weights(work / 'model' / name)
        assert bundle['normalize']['mean'] == pytest.approx(pixels.mean((0, 1, 2)).tolist(), abs=1e-7)
        assert bundle['normalize']['std'] == pytest.approx(pixels.std((0, 1, 2)).tolist(), abs=1e-7)
        assert bundle['classes'] == CLASSES and bundle['config']['recipe'] == 'fast'
        MyModel().load_state_dict(bundle['model'])  # still the tutorial's MyModel, key for key
    lr = [v for _, v in scalars(work / 'logs' / 'run', 'learning_rate')]
    peak = lr.index(max(lr))
    assert max(lr) == pytest.approx(0.02, rel=0.1) and 0 < peak < len(lr) - 1 and lr[-1] < 0.01


def test_resume_takes_the_interrupted_runs_settings_before_the_script_uses_them(fast_run, tmp_path, capsys):
    """The script builds its loss (label smoothing) from the parsed flags: they must already be last.pth's."""
    work, _ = fast_run
    state = load_weights(work / 'model' / 'last.pth')
    state['resume']['epoch'] = 1  # as if stopped after its first epoch
    torch.save(state, tmp_path / 'last.pth')
    args = parse('--resume', tmp_path / 'last.pth', '--recipe', 'tutorial', '--lr', 1, '--label-smoothing', 0,
                 '--epochs', 9)
    assert {k: getattr(args, k) for k in RECIPES['fast']} == {k: state['config'][k] for k in RECIPES['fast']}
    assert (args.recipe, args.label_smoothing, args.lr) == ('fast', 0.1, 0.02)
    assert args.epochs == 2 and 'training to epoch 2' in capsys.readouterr().out  # where the schedule ends
    fails_cleanly('train.py', ['--resume', tmp_path / 'last.pth', '--dry-run'], tmp_path, '--dry-run', '--resume')
    # the real run finished its schedule: it cannot be stretched to more epochs
    fails_cleanly('train.py', ['--resume', work / 'model' / 'last.pth', '--epochs', 9], tmp_path,
                  'finished all 2 epochs', 'new run')


def test_resuming_an_older_run_tests_on_the_views_it_tested_on(fast_run, tmp_path):
    """A last.pth from before --tta-views: 6 views if its run had a --tta-shift, else the image and its mirror
    image -- not the recipe's 3 of today; moved right and left, as before --tta-diagonal."""
    work, _ = fast_run
    state = load_weights(work / 'model' / 'last.pth')
    state['resume']['epoch'] = 1
    del state['config']['tta_views'], state['config']['tta_diagonal']
    for shift, views in ((2, 6), (0, 2)):
        state['config']['tta_shift'] = shift
        torch.save(state, tmp_path / 'last.pth')
        args = parse('--resume', tmp_path / 'last.pth', '--tta-diagonal')
        assert (args.tta, args.tta_views, args.tta_shift, args.tta_diagonal) == (True, views, shift, False)


def scores_by_hand(bundle: dict, cifar_dir, tta: bool) -> tuple:
    """(class scores, true classes) of the test split under a fast-recipe checkpoint, worked out here from
    torchvision's loader: its normalisation, MyModel, and with ``tta`` the recipe's views averaged in (the mirror
    image moved a pixel right and left, a black column where it left one)."""
    test = CIFAR10(str(cifar_dir), train=False)
    images = torch.from_numpy(test.data).permute(0, 3, 1, 2).float() / 255
    mean, std = (torch.tensor(bundle['normalize'][k]).view(1, 3, 1, 1) for k in ('mean', 'std'))
    model = MyModel().eval()
    model.load_state_dict(bundle['model'])
    right, left, mirrored = torch.zeros_like(images), torch.zeros_like(images), images.flip(3)
    right[..., 1:], left[..., :-1] = mirrored[..., :-1], mirrored[..., 1:]
    with torch.no_grad():
        scores = model((images - mean) / std)
        if tta:
            scores = (scores + model((right - mean) / std) + model((left - mean) / std)) / 3
    return scores, torch.tensor(test.targets)


def test_test_py_evaluates_the_fast_checkpoint_as_training_did(fast_run, cifar_dir):
    """test.py --eval, with the checkpoint's normalisation and test views, reproduces the training log's
    accuracy; without TTA it equals an evaluation written out by hand from the torchvision loader."""
    work, _ = fast_run
    best = load_weights(work / 'model' / 'best.pth')
    report = json.loads(run_main('test.py', '--eval', '--json', '--checkpoint', work / 'model' / 'best.pth',
                                 '--data-dir', cifar_dir, '--device', 'cpu', cwd=work).stdout)
    assert report['accuracy'] == pytest.approx(best['test_accuracy'], abs=1e-9) and best['config']['tta']

    plain = json.loads(run_main('test.py', '--eval', '--json', '--no-tta', '--checkpoint', work / 'model' /
                                'best.pth', '--data-dir', cifar_dir, '--device', 'cpu', cwd=work).stdout)
    scores, targets = scores_by_hand(best, cifar_dir, tta=False)
    assert plain['accuracy'] == pytest.approx((scores.argmax(1) == targets).float().mean().item())


def test_the_test_loss_is_plain_cross_entropy_per_image(fast_run, cifar_dir):
    """Trained with label smoothing 0.1, evaluated on the recipe's 3 views: the logged test_loss is still the plain
    cross-entropy, averaged over images (the tutorial summed per-batch means), worked out here by hand."""
    work, _ = fast_run
    outputs, targets = scores_by_hand(load_weights(work / 'model' / 'model_1.pth'), cifar_dir, tta=True)
    logged = dict(scalars(work / 'logs' / 'run', 'test_loss'))[1]
    assert logged == pytest.approx(nn.functional.cross_entropy(outputs, targets).item(), rel=1e-5)
    smoothed = nn.functional.cross_entropy(outputs, targets, label_smoothing=0.1).item()
    assert abs(logged - smoothed) > 100 * abs(logged) * 1e-5  # what the training loss would have said


def test_test_py_normalises_a_photo_for_a_fast_checkpoint(fast_run):
    work, _ = fast_run
    checkpoint = load_weights(work / 'model' / 'best.pth')
    out = json.loads(run_main('test.py', ROOT / 'images' / 'cat.jpg', '--json',
                              '--no-tta', '--top-k', 10, '--checkpoint', work / 'model' / 'best.pth',
                              '--device', 'cpu', cwd=work).stdout)
    model = MyModel().eval()
    model.load_state_dict(checkpoint['model'])
    image = script_module('test.py').load_image(ROOT / 'images' / 'cat.jpg')[None]
    with torch.no_grad():
        expected = nn.Sequential(Normalize(**checkpoint['normalize']), model)(image).softmax(1)[0]
    assert out['normalize'] == checkpoint['normalize'] and out['tta'] is False
    got = {t['class']: t['probability'] for t in out['predictions'][0]['top']}
    assert [got[name] for name in CLASSES] == pytest.approx(expected.tolist(), abs=1e-6)


def test_compare_recipes_reports_what_the_runs_logged(cifar_dir, tmp_path):
    """A constant-rate recipe is run once at the longest length and read at every length asked for."""
    result = run_main('compare_recipes.py', '--data-dir', cifar_dir, '--recipes', 'tutorial', '--epochs', 1, 2,
                      '--seeds', 0, '--device', 'cpu', '--out', tmp_path / 'runs', cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / 'runs').iterdir()) == ['recipes.png', 'tutorial-2ep-seed0']
    logged = [v for _, v in scalars(tmp_path / 'runs' / 'tutorial-2ep-seed0' / 'logs' / 'run', 'test_accuracy')]
    rows = [line for line in result.stdout.splitlines() if line.startswith('| tutorial |')]
    assert [row.split('|')[4].split('%')[0].strip() for row in rows[-2:]] == [f'{100 * v:.2f}' for v in logged]
    again = run_main('compare_recipes.py', '--data-dir', cifar_dir, '--recipes', 'tutorial', '--epochs', 1, 2,
                     '--seeds', 0, '--device', 'cpu', '--out', tmp_path / 'runs', cwd=tmp_path)
    assert '...' not in again.stdout and again.stdout.splitlines()[-4:-1] == result.stdout.splitlines()[-4:-1]
    assert result.stdout.splitlines()[-1] == f'accuracy against epochs: {tmp_path / "runs" / "recipes.png"}'
    with Image.open(tmp_path / 'runs' / 'recipes.png') as picture:
        assert picture.format == 'PNG' and picture.size == (700, 450)


def test_the_picture_shows_each_recipes_mean_and_spread_and_its_shorter_runs(tmp_path):
    curves = {'tutorial': {3: {0: [0.2, 0.3, 0.4], 1: [0.4, 0.5, 0.6]}},  # one constant-rate run per seed
              'fast': {2: {0: [0.5, 0.6], 1: [0.7, 0.8]}, 3: {0: [0.6, 0.7, 0.9], 1: [0.6, 0.7, 0.7]}}}
    figure = script_module('compare_recipes.py').draw(curves, tmp_path / 'plot' / 'recipes.png', 'test split')
    axes = figure.axes[0]
    lines = {line.get_label().split()[0]: line for line in axes.lines if not line.get_label().startswith('_')}
    assert list(lines['tutorial'].get_xdata()) == [1, 2, 3] and list(lines['fast'].get_xdata()) == [1, 2, 3]
    assert list(lines['tutorial'].get_ydata()) == pytest.approx([30, 40, 50])
    assert list(lines['fast'].get_ydata()) == pytest.approx([60, 70, 80])  # the 3-epoch runs' curve
    spreads = [band.get_paths()[0].vertices[:, 1] for band in axes.collections if band.get_paths()
               and len(band.get_paths()[0].vertices) > 2]
    bands = sorted((min(v), max(v)) for v in spreads)  # min .. max shaded
    assert [bound for band in bands for bound in band] == pytest.approx([20, 60, 60, 90])
    point = [line for line in axes.lines if list(line.get_xdata()) == [2] and line.get_marker() == 'o']
    # (the 2-epoch runs, at 60 and 80 %: their mean, and a bar from min to max)
    assert len(point) == 1 and list(point[0].get_ydata()) == pytest.approx([70])
    assert 'test split' in axes.get_ylabel() and (tmp_path / 'plot' / 'recipes.png').is_file()


def test_without_matplotlib_the_comparison_still_prints_its_table(cifar_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # (import matplotlib... then raises ImportError)
    monkeypatch.setitem(sys.modules, 'matplotlib.figure', None)
    result = run_main('compare_recipes.py', '--data-dir', cifar_dir, '--recipes', 'tutorial', '--epochs', 1,
                      '--seeds', 0, '--device', 'cpu', '--out', tmp_path / 'runs', cwd=tmp_path)
    assert result.stdout.splitlines()[-2].startswith('| tutorial | 1 | 0 |')
    assert result.stdout.splitlines()[-1] == 'no picture drawn: it needs matplotlib (python -m pip install matplotlib)'
    assert not (tmp_path / 'runs' / 'recipes.png').exists()
