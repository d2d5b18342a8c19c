"""The fast in-memory path feeds the model exactly what the tutorial's DataLoader + ToTensor() feeds it."""
from argparse import Namespace

import pytest
import torch
from PIL import Image

from conftest import write_cifar10, write_image_folders
from training.batches import StreamBatches, TensorBatches, cache_key, make_batches
from training.data import load_data

CPU = torch.device('cpu')


def options(**overrides):
    defaults = dict(loader='memory', batch_size=16, seed=3, num_workers=0, channels_last=True)
    return Namespace(**{**defaults, **overrides})


def all_batches(batches, epoch):
    batches.set_epoch(epoch)
    return list(batches)


@pytest.fixture(params=['cifar', 'folders'])
def data(request, tmp_path):
    if request.param == 'cifar':
        return load_data(write_cifar10(tmp_path, per_batch=30, test=20))
    return load_data(write_image_folders(tmp_path, train=11, test=5))  # mixed sizes, RGBA, JPEG


@pytest.mark.parametrize('channels_last', [True, False])
def test_memory_path_yields_the_dataloaders_tensors_in_the_same_order(data, channels_last):
    fast, fast_test = make_batches(data, options(channels_last=channels_last), CPU, say=lambda *a: None)
    slow, slow_test = make_batches(data, options(loader='stream', channels_last=channels_last), CPU)
    assert isinstance(fast, TensorBatches) and isinstance(slow, StreamBatches)
    for epoch in (0, 1):
        pairs = list(zip(all_batches(fast, epoch), all_batches(slow, epoch), strict=True))
        assert len(pairs) == len(fast) == len(slow)
        for (x, y), (x_ref, y_ref) in pairs:
            assert x.dtype == x_ref.dtype == torch.float32
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
            assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
    for (x, y), (x_ref, y_ref) in zip(fast_test, slow_test, strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_every_epoch_is_a_new_permutation_of_the_whole_set(data):
    fast, _ = make_batches(data, options(), CPU, say=lambda *a: None)
    orders = [torch.cat([y for _, y in all_batches(fast, epoch)]) for epoch in (0, 1)]
    labels = torch.tensor([label for _, label in data.train])
    assert torch.equal(orders[0].sort().values, labels.sort().values)
    assert not torch.equal(orders[0], orders[1])
    assert torch.equal(orders[0], torch.cat([y for _, y in all_batches(fast, 0)]))  # same epoch, same order


def test_image_folders_are_cached_and_the_cache_follows_the_files(tmp_path):
    root = write_image_folders(tmp_path, train=4, test=2)
    messages = []
    first, _ = make_batches(load_data(root), options(), CPU, say=messages.append)
    assert len(list((root / '.cache').glob('*.pt'))) == 2 and len(messages) == 2
    messages.clear()
    second, _ = make_batches(load_data(root), options(), CPU, say=messages.append)
    assert messages == []  # both splits came from the cache
    assert torch.equal(first.images, second.images)

    old_key = cache_key(load_data(root).train)
    picture = next((root / 'train' / 'dog').glob('*.png'))
    Image.new('RGB', (32, 32), (255, 0, 0)).save(picture)
    assert cache_key(load_data(root).train) != old_key
    third, _ = make_batches(load_data(root), options(), CPU, say=messages.append)
    assert len(messages) == 1 and 'train' in messages[0]  # rebuilt, and the stale file removed
    assert len(list((root / '.cache').glob('train-*.pt'))) == 1
    assert not torch.equal(third.images, first.images)


def test_a_damaged_cache_is_rebuilt(tmp_path):
    root = write_image_folders(tmp_path, train=4, test=2)
    reference, _ = make_batches(load_data(root), options(), CPU, say=lambda *a: None)
    for cached in (root / '.cache').glob('*.pt'):
        cached.write_bytes(b'garbage')
    again, _ = make_batches(load_data(root), options(), CPU, say=lambda *a: None)
    assert torch.equal(again.images, reference.images)


def test_data_where_no_cache_can_be_written_still_trains(tmp_path):
    root = write_image_folders(tmp_path, train=4, test=2)
    (root / '.cache').write_text('a file where the cache folder would go')  # unwritable, even for root
    messages = []
    fast, _ = make_batches(load_data(root), options(), CPU, say=messages.append)
    assert len(messages) == 2 and all('not cached' in m for m in messages)
    assert sum(len(labels) for _, labels in fast) == 12  # 3 classes x 4 images


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs an NVIDIA GPU')
def test_on_cuda_the_data_set_lives_on_the_gpu(tmp_path):
    data = load_data(write_cifar10(tmp_path, per_batch=30, test=20))
    fast, _ = make_batches(data, options(), torch.device('cuda'))
    slow, _ = make_batches(data, options(loader='stream'), CPU)
    assert fast.images.is_cuda
    for (x, y), (x_ref, y_ref) in zip(all_batches(fast, 0), all_batches(slow, 0), strict=True):
        assert x.is_cuda and torch.equal(x.cpu(), x_ref) and torch.equal(y.cpu(), y_ref)
