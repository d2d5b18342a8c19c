"""Training recipes for the same MyModel: the tutorial's, and ``fast``, which gets far more out of it.

Every ingredient is a flag of its own; ``--recipe`` only chooses the defaults of the flags you do not
give. The model is never changed, so every checkpoint still loads into the tutorial's ``MyModel``.

    ingredient               tutorial   fast     why
    --batch-size / --lr      64 / 0.01  128/0.05 momentum multiplies the step by ~10: 0.05 is near the
                                                 largest rate this net (no batch norm) survives
    --momentum / --nesterov  0 / off    0.9 / on averages the noisy gradients; Nesterov looks ahead
    --weight-decay           0          5e-4     keeps the classifier's weights small: less overfitting (the
                                                 biases have none, Muon's layers --muon-decay)
    --muon-lr / --muon-decay 0 / 0      0.02 /   the kernels and the first linear layer step by Muon: each
                                        0.05     step orthogonalised, so that every direction of a layer
                                                 learns at one pace (this net has no batch norm to even
                                                 them out); the classifier and biases stay with SGD
    --schedule / --warmup    constant   onecycle rise to --lr over the first 20 % of the steps (a cold
                                        / 0.2    net cannot take the full rate), then fall linearly to 0
    --label-smoothing        0          0.1      aims at 90 % confidence instead of 100 %: less overfitting
    --clip-grad              0 (off)    2        caps each step's gradient norm near its typical size
                                                 (1.5-2.5 here): an outlier batch can no longer throw the
                                                 weights away (NaN), as MyModel has no batch norm to keep
                                                 a high rate stable; accuracy is unchanged
    --normalize              off        on       per-channel mean 0 / std 1 inputs; the statistics go into
                                                 every checkpoint, and test.py applies them
    --flip                   off        on       a random mirror image, new every epoch, done on the device
    --alternate-flip         off        on in    instead, each image mirrored in every other epoch (a random
                                        5-14     half in the first): any two epochs in a row show every image
                                        epochs   both ways; +0.4 points after 5 epochs, -0.4 after 3, where
                                                 the runs have no crops (not measured from 15 epochs on)
    --crop-padding           0          3 (1     a random 32x32 crop of the image padded by 3 pixels: it
                                        from 5,  fights overfitting in long runs (4 pixels: too much
                                        0 under  with Muon); short runs underfit: 1 pixel is all 5
                                        5)       epochs profit from, 3 lose even by that (BENCHMARKS.md)
    --tta                    off        on       evaluate on several views of each image, average the logits
    --tta-views              2          3        the views: the image, and its mirror image moved --tta-shift
    --tta-shift              0          1 (0     pixels right and left (as a crop of padding 1 shows it): one
                                        under 5) pass more than the image and its mirror image, +0.4 points
                                                 after 5 epochs; a net trained without crops is misled by a
                                                 moved image (-1 point after 3), so shorter runs keep 2 views;
                                                 6 views (both images, each moved too) cost 3 more passes (13 %
                                                 of an epoch) for a few tenths more after 30 epochs
    --tta-diagonal           off        on (off  the mirror image moved right and down, and left and up,
                                        under 5) instead: the same passes, +0.08 points after 5 epochs
                                                 (held-out split, 6 nets, same weights; +0.09 on 54 others),
                                                 +0.5 after 30 (2 nets)
    --whiten-conv1           0          0.35     the first kernel's Muon steps preconditioned by C^-0.35, C
                                        (with    the covariance of its 5x5 input patches: Muon moves each
                                        Muon,    direction of a kernel alike, but one along which patches
                                        under    barely vary barely changes the output; +0.14 points after
                                        15)      5 epochs (held-out split, seeds 0-11); -0.18 after 30 (seed
                                                 0), so long runs keep plain Muon
"""
import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F


class ByLength:
    """A default that depends on the length of the run: ``long`` from ``epochs`` epochs on, else ``short``
    (itself a ByLength for a third length)."""

    def __init__(self, short, long, epochs: int):
        self.short, self.long, self.epochs = short, long, epochs

    def __call__(self, args):
        value = self.long if args.epochs >= self.epochs else self.short
        return value(args) if isinstance(value, ByLength) else value

    def __str__(self):
        below = self.short if isinstance(self.short, ByLength) else f'{shown(self.short)} below'
        return f'{shown(self.long)} from {self.epochs} epochs on, {below}'


def shown(value) -> str:
    """A default as the help shows it: a switch as on/off."""
    return ('on' if value else 'off') if isinstance(value, bool) else str(value)


class WithMuon:
    """The default of a setting that shapes Muon's steps: ``value`` where --muon-lr is on, else 0 (off)."""

    def __init__(self, value):
        self.value = value

    def __call__(self, args):
        value = self.value(args) if isinstance(self.value, ByLength) else self.value
        return value if args.muon_lr else 0.0

    def __str__(self):
        return f'{shown(self.value)}; 0 without Muon'


def in_5_to_14_epochs(value, otherwise):
    """``value`` as the default of runs of 5 to 14 epochs, ``otherwise`` in shorter and longer ones."""
    return ByLength(ByLength(otherwise, value, epochs=5), otherwise, epochs=15)


RECIPES = {
    'tutorial': dict(batch_size=64, lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0, schedule='constant',
                     warmup=0.0, label_smoothing=0.0, clip_grad=0.0, normalize=False, crop_padding=0, flip=False,
                     alternate_flip=False, tta=False, tta_views=2, tta_shift=0, tta_diagonal=False, muon_lr=0.0,
                     muon_decay=0.0, whiten_conv1=0.0),
    'fast': dict(batch_size=128, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, schedule='onecycle',
                 warmup=0.2, label_smoothing=0.1, clip_grad=2.0, normalize=True,
                 crop_padding=ByLength(ByLength(0, 1, epochs=5), 3, epochs=15), flip=True,
                 alternate_flip=in_5_to_14_epochs(True, otherwise=False), tta=True, tta_views=3,
                 tta_shift=ByLength(0, 1, epochs=5), tta_diagonal=ByLength(False, True, epochs=5),
                 muon_lr=0.02, muon_decay=0.05, whiten_conv1=WithMuon(ByLength(0.35, 0.0, epochs=15))),
}
SETTINGS = tuple(RECIPES['tutorial'])
STATS_SAMPLE = 10_000  # images the normalisation statistics are computed from
WHITENING_SAMPLE = 500  # images --whiten-conv1's patch statistics come from (every patch: half a million)
WHITENING_FLOOR = 0.01  # every variance raised by 1 % of their mean: directions that hardly vary stay damped


def apply_recipe(args) -> None:
    """Fill every recipe setting the command line left unset (None) from ``args.recipe``, in RECIPES' order (a
    default may depend on a setting before it)."""
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value(args) if callable(value) else value)


def fused_steps(device: torch.device) -> bool:
    """Whether SGD runs as PyTorch's fused kernels: on a GPU, where it takes fp16's gradient scaler's
    overflow flag on the device (the plain path asks for it with .item(), a CPU-GPU sync every step) and is
    one kernel launch instead of several. On the CPU the plain path stays, and with it the CPU's exact results."""
    return device.type == 'cuda'


def make_optimizer(model: nn.Module, args, train_batches=None) -> torch.optim.Optimizer:
    """SGD; weight decay applies to the weight matrices and kernels only, not to biases. With --muon-lr, every
    kernel and weight matrix but the last layer's steps by Muon instead (below); with --whiten-conv1 too, the first
    kernel's steps are whitened by the patches it sees in ``train_batches`` (first_layer_whitening)."""
    weights = [p for p in model.parameters() if p.dim() > 1]
    biases = [p for p in model.parameters() if p.dim() <= 1]
    if args.muon_lr:
        optimizer = Muon([{'params': weights[-1:], 'weight_decay': args.weight_decay},
                          {'params': biases, 'weight_decay': 0.0},
                          {'params': weights[:-1], 'weight_decay': args.muon_decay, 'muon': True,
                           'scale': args.muon_lr / args.lr}],
                         lr=args.lr, momentum=args.momentum, nesterov=args.nesterov)
        if args.whiten_conv1:  # (optimizer state: saved in last.pth, so --resume steps with the same matrix)
            conv = first_conv(model)
            optimizer.state[conv.weight]['whitening'] = \
                first_layer_whitening(train_batches, conv, args.whiten_conv1).to(conv.weight.device)
        return optimizer
    fused = fused_steps(weights[0].device) or None  # (None: PyTorch's own default, foreach where it can)
    return torch.optim.SGD([{'params': weights, 'weight_decay': args.weight_decay},
                            {'params': biases, 'weight_decay': 0.0}],
                           lr=args.lr, momentum=args.momentum, nesterov=args.nesterov, fused=fused)


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def first_layer_whitening(batches, conv: nn.Conv2d, power: float) -> torch.Tensor:
    """--whiten-conv1: patch_whitening of WHITENING_SAMPLE training images as the model gets them (normalised
    with the run's statistics), on the CPU: the same matrix in every process of a run, on any device."""
    images = batches.images_at(stats_sample(batches.n, WHITENING_SAMPLE))
    if batches.normalize:
        images = Normalize(**batches.normalize)(images)
    return patch_whitening(images, conv, power)


def patch_whitening(images: torch.Tensor, conv: nn.Conv2d, power: float) -> torch.Tensor:
    """C^-power, C the covariance of the patches ``conv`` sees in the N x C x H x W ``images``, each patch a vector
    in the order of a kernel's entries (in_channels x k x k), C's eigenvalues raised by WHITENING_FLOOR of their
    mean first. Muon steps the kernel, as a matrix W, by orth(G P) P for a gradient G (orthogonal_steps): Muon's
    own step for V in W = V P, V seeing the patches multiplied by P. power 0.5 whitens them (every direction of
    the patches varies alike), 0 leaves them. Why: the variance of CIFAR-10's 5x5 patches spans orders of
    magnitude (nearly six in a JPEG copy), from smooth colour ramps to the finest edges; Muon moves every direction of a kernel alike, but
    a direction changes the layer's output in proportion to how much the patches vary along it, so the kernels
    learn the ramps fast and the edges barely. The model is unchanged: only its steps are."""
    square, total, count = 0.0, 0.0, 0
    for part in images.split(250):  # (a quarter of a million patches at a time)
        patches = F.unfold(part, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # N x (C k k) x places
        square = square + (patches @ patches.transpose(1, 2)).sum(0).double()
        total, count = total + patches.sum((0, 2)).double(), count + patches.shape[0] * patches.shape[2]
    mean = total / count
    values, vectors = torch.linalg.eigh(square / count - torch.outer(mean, mean))
    values = values.clamp(min=0) + WHITENING_FLOOR * values.mean()
    return (vectors * values ** -power @ vectors.T).float()


def orthogonalize(matrices: list, steps: int = 5) -> list:
    """Each matrix with its singular values moved towards 1 (those of at least 1/100 of the largest to between
    about 0.68 and 1.2), its singular vectors kept: the Newton-Schulz iteration of Jordan et al.'s Muon (2024),
    x <- (a + b x x^T + c (x x^T)^2) x, no SVD. Each iterate is a polynomial in g = x x^T times the first x,
    so the iteration runs on the small square g alone (x x^T or x^T x, whichever is smaller) and multiplies x
    once at the end; and it runs on all the squares at once, each padded with zeros to the largest (a zero
    border stays zero, and the result's border is cut off): a few batched products instead of dozens of
    small ones, which is what a step on the CPU spends its time on."""
    a, b, c = 3.4445, -4.7750, 2.0315
    wide = [m.T if m.shape[0] > m.shape[1] else m for m in matrices]  # (x x^T the smaller of the two squares)
    wide = [x / (x.norm() + 1e-7) for x in wide]  # (every singular value at most 1: where the iteration converges)
    size = max(len(x) for x in wide)
    square = torch.zeros(len(wide), size, size, dtype=wide[0].dtype, device=wide[0].device)
    for padded, x in zip(square, wide):
        padded[:len(x), :len(x)] = x @ x.T
    eye = torch.eye(size, dtype=square.dtype, device=square.device).expand_as(square)
    polynomial = eye  # x_k = polynomial @ x, and square = x_k x_k^T
    for _ in range(steps):
        factor = torch.baddbmm(a * eye + b * square, square, square, alpha=c)
        polynomial = factor @ polynomial
        square = factor @ square @ factor  # (all polynomials in g: they commute)
    results = [p[:len(x), :len(x)] @ x for p, x in zip(polynomial, wide)]
    return [r.T if m.shape[0] > m.shape[1] else r for r, m in zip(results, matrices)]


def orthogonal_steps(updates: list, whitening: list) -> list:
    """Kernels' and weight matrices' steps, each seen as an out x in matrix, orthogonalised; a tall matrix's
    scaled up by sqrt(out / in), as in Muon, so that each output still moves as far. A step with a ``whitening``
    matrix P (not None): orth(step P) P, as if the layer saw its inputs multiplied by P (patch_whitening)."""
    rows = [update.reshape(len(update), -1) for update in updates]
    rows = [r if p is None else r @ p for r, p in zip(rows, whitening)]
    rows = [r if p is None else r @ p for r, p in zip(orthogonalize(rows), whitening)]
    return [r.view_as(update) * max(1.0, r.shape[0] / r.shape[1]) ** 0.5 for r, update in zip(rows, updates)]


class Muon(torch.optim.Optimizer):
    """SGD with (Nesterov) momentum -- torch.optim.SGD's rule -- except in the groups marked ``muon``: there each
    step, a kernel seen as an out_channels x (in_channels * 5 * 5) matrix, is orthogonalised before it is taken,
    at ``scale`` times the group's rate, and weight decay shrinks the weights by lr * decay directly. An
    orthogonal step moves every direction of the layer by the same amount: plain SGD moves the few directions
    of its largest gradients fastest, and this network, without batch norm, has badly scaled ones.

    Under fp16 it takes the gradient scaler's overflow flag on the device, as fused SGD does: no sync."""
    _step_supports_amp_scaling = True  # (GradScaler then sets .grad_scale and .found_inf before each step)

    def __init__(self, groups, lr: float, momentum: float, nesterov: bool):
        super().__init__(groups, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=0.0, muon=False,
                                      scale=1.0))

    @torch.no_grad()
    def step(self, closure=None):
        grad_scale, found_inf = getattr(self, 'grad_scale', None), getattr(self, 'found_inf', None)
        for group in self.param_groups:
            lr, momentum, decay = group['lr'] * group['scale'], group['momentum'], group['weight_decay']
            params = [p for p in group['params'] if p.grad is not None]
            grads = [p.grad for p in params]  # (the _foreach_ functions: one call for a list of tensors)
            if grad_scale is not None:
                grads = torch._foreach_div(grads, grad_scale)
            if decay and not group['muon']:
                grads = torch._foreach_add(grads, params, alpha=decay)
            buffers = [self.state[p].setdefault('momentum_buffer', torch.zeros_like(p)) for p in params]
            moved = torch._foreach_add(torch._foreach_mul(buffers, momentum), grads)
            updates = torch._foreach_add(grads, moved, alpha=momentum) if group['nesterov'] else moved
            if group['muon']:  # (--whiten-conv1: the first kernel's state holds its whitening matrix)
                updates = orthogonal_steps(updates, [self.state[p].get('whitening') for p in params])
                if decay:
                    torch._foreach_add_(updates, params, alpha=decay)
            if found_inf is not None:  # fp16: a step whose gradients overflowed changes nothing
                skip = found_inf.bool()
                updates = [torch.where(skip, 0.0, update) for update in updates]
                moved = [torch.where(skip, old, new) for old, new in zip(buffers, moved)]
            torch._foreach_copy_(buffers, moved)
            torch._foreach_add_(params, updates, alpha=-lr)


def lr_schedule(args, total_steps: int):
    """The learning rate of each step (0-based), a function of the step alone so that a resumed run
    continues on the same curve; --lr at every step with the constant schedule."""
    warmup_steps = args.warmup * total_steps

    def lr_at(step: int) -> float:
        if args.schedule == 'constant':
            return args.lr
        if step < warmup_steps:  # (capped: a warm-up of 3.5 steps would give 4 / 3.5 of --lr at its last step)
            return args.lr * min((step + 1) / warmup_steps, 1.0)
        done = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        if args.schedule == 'onecycle':
            return args.lr * (1 - done)
        return args.lr * 0.5 * (1 + math.cos(math.pi * done))  # cosine
    return lr_at


def set_learning_rate(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group['lr'] = lr


def clip_gradients(model: nn.Module, max_norm: float, optimizer=None, scaler=None) -> None:
    """--clip-grad: scale the gradients down to at most ``max_norm`` (0: leave them). No sync: the norm
    stays on the device. Under fp16 the gradients are unscaled first, so that the norm is the true one."""
    if max_norm:
        if scaler is not None and scaler.is_enabled():
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


class Normalize(nn.Module):
    """(image - mean) / std per channel, on whatever device the model is."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images):
        return (images - self.mean) / self.std


def moved(images: torch.Tensor, dx: int, dy: int, black) -> torch.Tensor:
    """N x C x H x W images moved ``dx`` pixels right (left if negative) and ``dy`` down (up if negative), the
    uncovered rows and columns ``black`` (a number, or a 1 x C x 1 x 1 tensor): what a training crop of the
    padded image shows."""
    out = torch.empty_like(images)
    out[...] = black  # (a fill, or a broadcast from a tensor already on the device: no copy from the CPU)
    height, width = images.shape[2:]
    out[..., max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        images[..., max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
    return out


def views_used(views: int, shift: int) -> int:
    """How many views --tta-views ``views`` gives with --tta-shift ``shift``: 0 moves nothing, leaving 2."""
    return views if shift else 2


class Views(NamedTuple):
    """--tta's views (see test_time_views), named as a run's settings name them, so that the scripts hand over
    their settings and test.py a checkpoint's (Views.saved)."""
    tta_views: int = 2
    tta_shift: int = 0
    tta_diagonal: bool = False

    @classmethod
    def saved(cls, config: dict) -> 'Views':
        """The views a checkpoint's run was tested on: before --tta-views, 6 with a --tta-shift, else 2; before
        --tta-diagonal, moved right and left."""
        return cls(saved_views(config), config.get('tta_shift', 0), config.get('tta_diagonal', False))


def test_time_views(images: torch.Tensor, settings=Views(), black=0.0) -> list:
    """--tta's views of a batch, as ``settings`` (a run's, or Views) ask: --tta-views 2, the images and their mirror
    images; 3, the images and their mirror images moved --tta-shift pixels right and left; 6, the images and their
    mirror images, each also moved right and left. With --tta-shift 0 all three are the first two. With
    --tta-diagonal every move is down as far as it is right (right and down, left and up) instead."""
    views, shift = settings.tta_views, settings.tta_shift
    mirrored = images.flip(3)
    if views_used(views, shift) == 2:
        return [images, mirrored]
    down = shift if settings.tta_diagonal else 0
    if views == 3:
        return [images, moved(mirrored, shift, down, black), moved(mirrored, -shift, -down, black)]
    there, back = (moved(images, dx, dy, black) for dx, dy in ((shift, down), (-shift, -down)))
    return [images, mirrored, there, moved(mirrored, -shift, -down, black), back, moved(mirrored, shift, down, black)]


def saved_views(config: dict) -> int:
    """The --tta-views a checkpoint's run was tested with; runs from before the setting had 6 views with a
    --tta-shift, else 2."""
    return config.get('tta_views') or (6 if config.get('tta_shift') else 2)


def describe_views(settings) -> str:
    """test_time_views' views in words."""
    if views_used(settings.tta_views, settings.tta_shift) == 2:
        return 'the image and its mirror image'
    each = ', each also' if settings.tta_views == 6 else ''
    ways = 'right and down, and left and up' if settings.tta_diagonal else 'right and left'
    return f'the image and its mirror image{each} moved {settings.tta_shift} px {ways}'


def test_time_average(model: nn.Module, images: torch.Tensor, outputs: torch.Tensor, settings=Views(), black=0.0):
    """--tta in the scripts' test loop: the mean of the scores of every view ``settings`` (the run's) ask for
    (``outputs``: the first view's, already computed; see test_time_views)."""
    every = test_time_views(images, settings, black)
    for view in every[1:]:
        outputs = outputs + model(view)
    return outputs / len(every)


class ViewAverage(nn.Module):
    """Test-time augmentation: the mean of the logits for every view of the image (see test_time_views)."""

    def __init__(self, model: nn.Module, views: Views = Views()):
        super().__init__()
        self.model, self.views = model, views

    def forward(self, images):  # (black: 0, as the images are moved before Normalize)
        return test_time_average(self.model, images, self.model(images), self.views)


def inference_net(model: nn.Module, normalize=None, views: Views = None) -> nn.Module:
    """What a checkpoint's images go through: its normalisation (if any), then the model, on every one of
    ``views`` (see test_time_views; None: the image alone). ``normalize`` is the checkpoint's
    {'mean': [...], 'std': [...]}."""
    net = nn.Sequential(Normalize(**normalize), model) if normalize else model
    return ViewAverage(net, views) if views else net


def channel_stats(images: torch.Tensor) -> dict:
    """Per-channel mean and standard deviation of N x 3 x H x W images in [0, 1]."""
    images = images.double()
    return {'mean': images.mean((0, 2, 3)).tolist(), 'std': images.std((0, 2, 3)).clamp(min=1e-3).tolist()}


def stats_sample(n: int, size: int = STATS_SAMPLE) -> torch.Tensor:
    """Which training images the statistics come from: the same ones whatever --seed is (a smaller ``size``:
    some of the same)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:size].sort().values


def augment_plan(n: int, seed: int, epoch: int, padding: int, flip: bool, alternate_at=None) -> torch.Tensor:
    """Per position in epoch ``epoch``'s order: (row shift, column shift, mirror), from (seed, epoch) only,
    so a resumed epoch augments exactly as an uninterrupted one would. ``alternate_at``, the epoch's order
    (which image sits at each position): each image is mirrored in every other epoch instead of at random,
    a random half of them from the first, so that any two epochs in a row show every image both ways."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch + (1 << 40))  # apart from epoch_order's
    shifts = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    if flip and alternate_at is not None:
        first = torch.Generator().manual_seed(seed * 100_003 + (1 << 41))  # the same in every epoch
        mirrored_first = torch.rand(n, generator=first) < 0.5  # per image
        mirror = (mirrored_first ^ bool(epoch % 2))[alternate_at]
    else:
        mirror = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return torch.cat([shifts, mirror[:, None].long()], 1)


def augment(images: torch.Tensor, plan: torch.Tensor, padding: int) -> torch.Tensor:
    """Random crop with zero padding, then mirror, for a batch of N x H x W x C images (any dtype) in one
    gather: torchvision's RandomCrop(padding=padding) + RandomHorizontalFlip, for the whole batch at once."""
    n, height, width = images.shape[:3]
    if padding:
        images = F.pad(images, (0, 0, padding, padding, padding, padding))
    plan = plan.to(images.device)
    rows = plan[:, 0:1] + torch.arange(height, device=images.device)
    columns = torch.arange(width, device=images.device).expand(n, width)
    columns = torch.where(plan[:, 2:3].bool(), width - 1 - columns, columns) + plan[:, 1:2]
    batch = torch.arange(n, device=images.device)[:, None, None]
    return images[batch, rows[:, :, None], columns[:, None, :]]
