"""The fast in-memory path feeds the model exactly what the tutorial's DataLoader + ToTensor() feeds it."""
import os
import re
import signal
from argparse import Namespace

import pytest
import torch
from PIL import Image

from conftest import same_length, working_directory, write_cifar10, write_image_folders
from torchvision.transforms import functional as TF

from training import batches
from training.batches import (Augmentation, StreamBatches, TensorBatches, cache_key, decode_cached, epoch_order,
                              make_batches)
from training.data import hold_out, load_data
from training.distributed import ProcessGroup
from training.errors import UnreadableImage, UserError
from training.recipe import augment, augment_plan

CPU = torch.device('cpu')


def options(**overrides):
    defaults = dict(loader='memory', batch_size=16, seed=3, num_workers=0, channels_last=True, crop_padding=0,
                    flip=False, alternate_flip=False)
    return Namespace(**{**defaults, **overrides})


def all_batches(batches, epoch):
    return list(batches.epoch(epoch))


@pytest.fixture(params=['cifar', 'folders'])
def data(request, tmp_path):
    if request.param == 'cifar':
        return load_data(write_cifar10(tmp_path, per_batch=30, test=20))
    return load_data(write_image_folders(tmp_path, train=11, test=5))  # mixed sizes, RGBA, JPEG


@pytest.mark.parametrize('channels_last, augmented', [(True, False), (False, False), (True, True)])
def test_memory_path_yields_the_dataloaders_tensors_in_the_same_order(data, channels_last, augmented):
    recipe = dict(channels_last=channels_last, crop_padding=4 if augmented else 0, flip=augmented)
    fast, fast_test = make_batches(data, options(**recipe), CPU)
    slow, slow_test = make_batches(data, options(loader='stream', **recipe), CPU)
    assert isinstance(fast, TensorBatches) and isinstance(slow, StreamBatches)
    for epoch in (0, 1):
        pairs = list(same_length(all_batches(fast, epoch), all_batches(slow, epoch)))
        assert len(pairs) == len(fast) == len(slow)
        for (x, y), (x_ref, y_ref) in pairs:
            assert x.dtype == x_ref.dtype == torch.float32
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
            assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
            assert x_ref.is_contiguous(memory_format=torch.channels_last) == channels_last
    for (x, y), (x_ref, y_ref) in same_length(fast_test, slow_test):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
        assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert x_ref.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize('loader', ['memory', 'stream'])
def test_both_splits_come_on_the_training_device(data, loader):
    """PyTorch's 'meta' device stands in for a GPU; the training split is cropped and mirrored there."""
    for split in make_batches(data, options(loader=loader, crop_padding=4, flip=True), torch.device('meta')):
        for images, labels in split:
            assert images.is_meta and labels.is_meta and images.shape[1:] == (3, 32, 32)


def test_every_epoch_is_a_new_permutation_of_the_whole_set(data):
    fast, _ = make_batches(data, options(), CPU)
    orders = [torch.cat([y for _, y in all_batches(fast, epoch)]) for epoch in (0, 1)]
    labels = torch.tensor([label for _, label in data.train])
    assert torch.equal(orders[0].sort().values, labels.sort().values)
    assert not torch.equal(orders[0], orders[1])
    assert torch.equal(orders[0], torch.cat([y for _, y in all_batches(fast, 0)]))  # same epoch, same order


@pytest.mark.parametrize('flip', [True, False])
def test_augmentation_is_torchvisions_random_crop_and_flip(flip):
    """Each image of a batch, cropped (and mirrored) in one gather, equals torchvision's pad + crop (+ hflip)
    of that image with the same offsets; the plan gives every offset and, with flip, both mirror states."""
    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8)
    plan = augment_plan(64, seed=1, epoch=2, padding=4, flip=flip)
    out = augment(images, plan, padding=4)
    assert out.shape == images.shape and out.dtype == torch.uint8
    for image, (top, left, mirror), result in zip(images, plan.tolist(), out):
        expected = TF.crop(TF.pad(image.permute(2, 0, 1), 4), top, left, 32, 32)
        if mirror:
            expected = TF.hflip(expected)
        assert torch.equal(result.permute(2, 0, 1), expected)
    assert set(plan[:, :2].flatten().tolist()) == set(range(9))
    assert set(plan[:, 2].tolist()) == ({0, 1} if flip else {0})
    assert torch.equal(plan, augment_plan(64, 1, 2, 4, flip))  # (seed, epoch) decide it
    assert not torch.equal(plan, augment_plan(64, 1, 3, 4, flip))


@pytest.mark.parametrize('loader', ['memory', 'stream'])
def test_alternate_flip_mirrors_each_image_in_every_other_epoch(data, loader):
    """--alternate-flip: a random half of the images mirrored in the first epoch, each image mirrored exactly
    when it was not in the epoch before, wherever the epoch's shuffle puts it; crops stay random."""
    alternate, _ = make_batches(data, options(flip=True, loader=loader, alternate_flip=True), CPU)
    plain, _ = make_batches(data, options(flip=True, loader=loader), CPU)

    def mirrored(batches, epoch):  # per image (by its label-order index), whether it came mirrored
        order = epoch_order(batches.n, 3, epoch)  # (options' seed)
        shown = torch.cat([x for x, _ in all_batches(batches, epoch)])
        original = batches.images_at(order)
        assert all(torch.equal(s, o) or torch.equal(s, o.flip(2)) for s, o in zip(shown, original))
        flags = torch.tensor([not torch.equal(s, o) for s, o in zip(shown, original)])
        return torch.empty_like(flags).index_put_((order,), flags)

    epochs = [mirrored(alternate, e) for e in range(3)]
    assert 0.3 < epochs[0].float().mean() < 0.7
    assert torch.equal(epochs[1], ~epochs[0]) and torch.equal(epochs[2], epochs[0])
    at_random = [mirrored(plain, e) for e in range(3)]
    assert not torch.equal(at_random[1], ~at_random[0])


def test_augmentation_happens_on_the_device_the_images_are_on():
    """PyTorch's 'meta' device stands in for a GPU: tensors with a device and a shape but no values; a plan made
    on the CPU meets the images there."""
    images = torch.empty(8, 32, 32, 3, dtype=torch.uint8, device='meta')
    out = augment(images, augment_plan(8, seed=1, epoch=0, padding=4, flip=True), padding=4)
    assert (out.device.type, out.shape, out.dtype) == ('meta', images.shape, torch.uint8)


@pytest.mark.parametrize('loader', ['memory', 'stream'])
def test_augmented_epochs_differ_and_a_resumed_epoch_continues_the_same_way(data, loader):
    fast, _ = make_batches(data, options(crop_padding=4, flip=True, loader=loader), CPU)
    epoch_0 = all_batches(fast, 0)
    resumed = fast.epoch(0, skip=2)  # resuming after two batches
    assert all(torch.equal(a[0], b[0]) for a, b in same_length(epoch_0[2:], resumed))
    plain, _ = make_batches(data, options(loader=loader), CPU)
    assert not torch.equal(epoch_0[0][0], all_batches(plain, 0)[0][0])  # the images really changed


def test_validation_split_is_held_out_of_the_training_set(data, monkeypatch):
    held = hold_out(data, 7)
    loads = []
    monkeypatch.setattr(batches, 'decode_cached', lambda dataset, *rest: loads.append(dataset) or
                        decode_cached(dataset, *rest))
    fast, fast_val = make_batches(held, options(), CPU)
    assert loads == [data.train]  # both splits are cut from one decoded training set
    slow, slow_val = make_batches(held, options(loader='stream'), CPU)
    assert len(held.train) + len(held.test) == len(data.train) and len(held.test) == 7
    assert not set(held.train.indices) & set(held.test.indices)
    assert held.test.indices == hold_out(data, 7).test.indices  # the same images every time
    for (x, y), (x_ref, y_ref) in same_length(fast_val, slow_val):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert torch.equal(torch.cat([y for _, y in all_batches(fast, 0)]),
                       torch.cat([y for _, y in all_batches(slow, 0)]))


def test_auto_holds_the_data_set_when_it_takes_under_a_quarter_of_the_free_memory(monkeypatch):
    """400 images of 32 x 32 x 3 bytes; the free memory is the computer's, or on a GPU that GPU's free memory."""
    data, needed = Namespace(train=range(300), test=range(100)), 400 * 3072
    asked = []

    def gpu_memory(device):
        asked.append(device)
        return gpu_free, 80 * needed  # (free, total)
    monkeypatch.setattr(torch.cuda, 'mem_get_info', gpu_memory)
    for free, fits in [(4 * needed + 4, True), (4 * needed + 3, False), (4 * needed, False), (needed, False)]:
        monkeypatch.setattr(batches, 'available_memory', lambda: free)
        gpu_free = 8 * needed - free  # (another figure, so that each choice shows whose memory it went by)
        assert batches.fits_in_memory(data, CPU) == fits
        gpu_free = free
        monkeypatch.setattr(batches, 'available_memory', lambda: 8 * needed - free)
        assert batches.fits_in_memory(data, torch.device('cuda', 1)) == fits
    assert asked == [torch.device('cuda', 1)] * 4


@pytest.mark.parametrize('fits', [True, False])
def test_auto_holds_the_data_set_in_memory_when_it_fits_and_streams_it_when_not(data, fits, monkeypatch):
    monkeypatch.setattr(batches, 'fits_in_memory', lambda data, device: fits)
    kind = TensorBatches if fits else StreamBatches
    assert [type(b) for b in make_batches(data, options(loader='auto'), CPU)] == [kind, kind]


def test_image_folders_are_cached_and_the_cache_follows_the_files(tmp_path, capsys):
    def messages():
        return capsys.readouterr().out.splitlines()

    root = write_image_folders(tmp_path, train=4, test=2)
    first, _ = make_batches(load_data(root), options(), CPU)
    assert len(list((root / '.cache').glob('*.pt'))) == 2 and len(messages()) == 2
    second, _ = make_batches(load_data(root), options(), CPU)
    assert messages() == []  # both splits came from the cache
    assert torch.equal(first.images, second.images)
    with working_directory(root.parent):
        make_batches(load_data(root.name), options(), CPU)  # the same folder, by a relative path
    assert messages() == []

    old_key = cache_key(load_data(root).train)
    picture = next((root / 'train' / 'dog').glob('*.png'))
    renamed = picture.rename(picture.with_name(picture.stem + 'a.png'))  # (its place, size and time unchanged)
    assert cache_key(load_data(root).train) != old_key
    renamed.rename(picture)
    assert cache_key(load_data(root).train) == old_key
    Image.new('RGB', (32, 32), (255, 0, 0)).save(picture)
    assert cache_key(load_data(root).train) != old_key
    third, _ = make_batches(load_data(root), options(), CPU)
    rebuilt = messages()
    assert len(rebuilt) == 1 and 'train' in rebuilt[0]  # rebuilt, and the stale file removed
    assert len(list((root / '.cache').glob('train-*.pt'))) == 1
    assert not torch.equal(third.images, first.images)


def test_a_damaged_cache_is_rebuilt(tmp_path):
    root = write_image_folders(tmp_path, train=4, test=2)
    reference, _ = make_batches(load_data(root), options(), CPU)
    for cached in (root / '.cache').glob('*.pt'):
        cached.write_bytes(b'garbage')
    again, _ = make_batches(load_data(root), options(), CPU)
    assert torch.equal(again.images, reference.images)


def test_data_where_no_cache_can_be_written_still_trains(tmp_path, capsys):
    root = write_image_folders(tmp_path, train=4, test=2)
    (root / '.cache').write_text('a file where the cache folder would go')  # unwritable, even for root
    fast, _ = make_batches(load_data(root), options(), CPU)
    messages = capsys.readouterr().out.splitlines()
    assert len(messages) == 2 and all('not cached' in m for m in messages)
    assert all(re.search(r'/\.cache is not writable \([A-Z][a-z ]+\)\)$', m) for m in messages), messages  # in words
    assert sum(len(labels) for _, labels in fast) == 12  # 3 classes x 4 images


def test_decoding_says_how_many_images_took_how_long_and_where_they_are_cached(tmp_path, capsys, monkeypatch):
    root = write_image_folders(tmp_path, train=4, test=2)
    clock = iter([100.0, 102.25, 200.0, 200.5])
    monkeypatch.setattr(batches, 'time', Namespace(perf_counter=lambda: next(clock)))
    make_batches(load_data(root), options(), CPU)
    train, test = capsys.readouterr().out.splitlines()
    assert re.fullmatch(rf'decoded 12 train images in 2\.2s \(cached in {re.escape(str(root))}/\.cache/train-\w+\.pt\)',
                        train), train
    assert test.startswith('decoded 6 test images in 0.5s (cached in ')


def test_a_cache_file_is_never_run_as_code(tmp_path):
    """A .pt file that would call a function when unpickled (as any pickle can) is rebuilt, and nothing called."""
    root = write_image_folders(tmp_path, train=4, test=2)
    reference, _ = make_batches(load_data(root), options(), CPU)
    marker = tmp_path / 'called'

    class Payload:
        def __reduce__(self):
            return marker.touch, ()
    for cached in (root / '.cache').glob('*.pt'):
        torch.save({'images': Payload(), 'labels': Payload()}, cached)
    again, _ = make_batches(load_data(root), options(), CPU)
    assert not marker.exists() and torch.equal(again.images, reference.images)


def test_fake_data_decodes_to_its_own_images_however_many_threads_are_offered():
    """FakeData seeds PyTorch's global random generator for each image: threads would mix up their images."""
    from training.data import fake_data
    train = fake_data(batch_size=128, seed=0).train  # 512 images
    images, labels = batches.decode(train, threads=8)
    one_by_one = torch.stack([image for image, _ in train])
    assert torch.equal(images, one_by_one.mul(255).round().byte().permute(0, 2, 3, 1))


def tiny_set(n: int) -> tuple:
    """n random images (the same for each call) labelled 0 ... n - 1: as uint8 N x H x W x C, the labels, and
    as a Dataset of what ToTensor() gives."""
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    labels = torch.arange(n)
    return images, labels, torch.utils.data.TensorDataset(images.permute(0, 3, 1, 2).float().div(255), labels)


def both_paths(n: int, batch_size: int) -> list:
    """A memory and a stream path over the same n images, both shuffled by one seed."""
    images, labels, dataset = tiny_set(n)
    return [TensorBatches(images, labels, batch_size, CPU, shuffle_seed=5),
            StreamBatches(dataset, batch_size, num_workers=0, shuffle_seed=5)]


@pytest.mark.parametrize('path', [0, 1], ids=['memory', 'stream'])
def test_processes_of_one_run_take_consecutive_parts_of_each_global_batch(path):
    """train_ddp.py's sharing, in one process: 21 images in global batches of 8 (8, 8, 5) for two processes."""
    whole = all_batches(both_paths(21, 8)[path], 1)
    parts, shares = [], []
    for rank in (0, 1):
        batches = both_paths(21, 8)[path]
        batches.share_with(ProcessGroup(rank, 2, CPU))
        parts.append([])
        for batch in batches.epoch(1):
            parts[-1].append(batch)
            shares.append(batches.share_of_batch)
    assert [len(y) for _, y in parts[0]] == [4, 4, 3] and [len(y) for _, y in parts[1]] == [4, 4, 2]
    for (x, y), (x0, y0), (x1, y1) in same_length(whole, *parts):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert shares == [0.5, 0.5, 3 / 5, 0.5, 0.5, 2 / 5]  # what each process's gradients are weighted by


@pytest.mark.parametrize('loader', ['memory', 'stream'])
def test_in_a_run_of_several_processes_both_splits_give_this_processs_part(data, loader):
    """Batches of 14: the folders' test split ends in a batch of 1 image, which a test split may leave to one."""
    train, test = make_batches(data, options(loader=loader, batch_size=14), CPU, group=ProcessGroup(1, 2, CPU))
    alone, _ = make_batches(data, options(loader=loader, batch_size=14), CPU)
    assert [len(y) for _, y in train.epoch(0)] == [len(y) // 2 for _, y in alone.epoch(0)]  # the second half
    assert (train.rank, train.world_size, test.rank, test.world_size) == (1, 2, 1, 2)


def test_a_global_batch_the_processes_cannot_share_is_refused_with_its_fix():
    with pytest.raises(UserError, match=r'^--batch-size 8 is the global batch .* 3 processes: give a multiple of 3$'):
        both_paths(21, 8)[0].share_with(ProcessGroup(0, 3, CPU))
    for n, fits in [(16, True), (17, False), (18, True)]:  # last batch of 0, 1 and 2 images for 2 processes
        for batches in both_paths(n, 8):
            batches.share_with(ProcessGroup(1, 2, CPU), training=False)  # a test batch of 1 image may go to one
            assert batches.rank == 1
            if fits:
                batches.share_with(ProcessGroup(1, 2, CPU))
            else:
                with pytest.raises(UserError, match=r'^the last batch of an epoch would have 1 image\(s\), too few '
                                                    r'for 2 processes to share: choose another --batch-size$'):
                    batches.share_with(ProcessGroup(1, 2, CPU))


def test_the_stream_paths_sampler_says_how_many_batches_it_gives():
    """len(DataLoader) is the sampler's: the batches left in the epoch, also for a resumed one."""
    batches = both_paths(21, 8)[1]
    for skip, left in [(0, 3), (2, 1), (3, 0), (5, 0)]:
        batches.sampler.skip = skip
        assert len(batches.loader) == len(list(batches.sampler)) == left


class WhoServes(torch.utils.data.Dataset):
    """Each image's label says which process read it, and whether that process ignores Ctrl+C."""

    def __len__(self):
        return 6

    def __getitem__(self, index):
        return torch.zeros(3, 32, 32), torch.tensor([os.getpid(), signal.getsignal(signal.SIGINT) == signal.SIG_IGN])


def test_the_stream_paths_worker_serves_every_epoch_and_leaves_ctrl_c_to_training():
    batches = StreamBatches(WhoServes(), 4, num_workers=1, shuffle_seed=0)
    served = torch.cat([labels for epoch in (0, 1) for _, labels in batches.epoch(epoch)])
    assert len(served) == 12
    assert len(set(served[:, 0].tolist()) - {os.getpid()}) == 1  # one worker, started once for both epochs
    assert served[:, 1].all()  # a Ctrl+C is for the main process, which saves before it stops


@pytest.mark.parametrize('workers', [0, 1])
def test_the_stream_path_leaves_the_global_random_state_alone(workers):
    """Dropout, or anything else a learner adds, draws the same numbers whichever path feeds training."""
    batches = StreamBatches(tiny_set(21)[2], 8, num_workers=workers, shuffle_seed=5)
    before = torch.get_rng_state()
    for epoch in (0, 1):
        all_batches(batches, epoch)
    assert torch.equal(torch.get_rng_state(), before)


def test_the_stream_path_moves_each_batch_to_the_device_and_augments_and_normalises_it_there():
    """PyTorch's 'meta' device stands in for a GPU (its tensors have a device but no values)."""
    meta = torch.device('meta')
    batches = StreamBatches(tiny_set(21)[2], 8, 0, shuffle_seed=5, device=meta,
                            augmentation=Augmentation(padding=4, flip=True, seed=0))
    batches.set_normalization({'mean': [0.5] * 3, 'std': [0.25] * 3}, meta)
    assert not batches.loader.pin_memory  # (only for a GPU)
    for images, labels in batches.epoch(0):
        assert images.device == labels.device == meta and images.shape[1:] == (3, 32, 32)


def test_an_image_that_cannot_be_read_ends_the_stream_with_its_own_message():
    class OneBroken(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, index):
            if index == 7:
                raise UserError('unreadable image cat/7.png: truncated file; replace or delete it')
            return torch.zeros(3, 32, 32), 0

    batches = StreamBatches(OneBroken(), 4, num_workers=0)
    epoch = batches.epoch(0)
    assert len(next(epoch)[1]) == 4  # images 0-3
    with pytest.raises(UnreadableImage, match=r'^unreadable image cat/7.png: truncated file; replace or delete it$'):
        next(epoch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs an NVIDIA GPU')
@pytest.mark.parametrize('augmented', [False, True])
def test_on_cuda_both_paths_give_the_cpus_batches_on_the_gpu(augmented, tmp_path):
    """The memory path holds the data set on the GPU; the stream path copies pinned batches there and crops,
    mirrors and normalises them there: both give exactly the CPU's tensors."""
    data = load_data(write_cifar10(tmp_path, per_batch=30, test=20))
    recipe = dict(crop_padding=4, flip=True, normalize=True) if augmented else {}
    cuda = torch.device('cuda')
    fast, _ = make_batches(data, options(**recipe), cuda)
    streamed, _ = make_batches(data, options(loader='stream', **recipe), cuda)
    slow, _ = make_batches(data, options(loader='stream', **recipe), CPU)
    assert fast.images.is_cuda and streamed.loader.pin_memory
    for (x, y), (xs, ys), (x_ref, y_ref) in same_length(all_batches(fast, 0), all_batches(streamed, 0),
                                                        all_batches(slow, 0)):
        assert x.is_cuda and xs.is_cuda and ys.is_cuda
        assert torch.equal(x.cpu(), x_ref) and torch.equal(xs.cpu(), x_ref) and torch.equal(y.cpu(), y_ref)
