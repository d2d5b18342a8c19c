"""Ready for a GPU, checked without one: what would only show on a GPU machine, made to show here.

- A training step makes the CPU wait for the GPU whenever it asks a device tensor for a Python value (.item(),
  .tolist(), bool(...)), copies one to the CPU, or runs an operation whose output size depends on the data
  (nonzero ...). Where a step does so is the same on every device, so counting those calls during each step of
  a real run on the CPU keeps the GPU's promise: none outside the --log-interval steps, on every path a GPU
  takes (both loaders; fp32, bf16, and fp16 with fused SGD, which takes the gradient scaler's overflow flag on
  the device). With a GPU, PyTorch's own sync detector (torch.cuda.set_sync_debug_mode) checks the same steps.
- Checkpoints hold CPU tensors, whatever device trained them: a model on a (simulated) CUDA device, saved.
- --deterministic, and --eval evaluating as training did.
"""
import contextlib
import itertools

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import training.recipe
from conftest import load_weights, run_main, same_weights, script_module, write_cifar10
from model import MyModel
from training.checkpoint import cpu_weights
from training.progress import Progress, training_state
from training.recipe import make_optimizer

aten = torch.ops.aten
# operations that wait for the device: a value for Python, or an output whose size depends on the data
SYNCING_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
               aten.is_nonzero.default, aten.equal.default, aten._unique2.default, aten.unique_dim.default,
               aten.unique_consecutive.default}
# what a step asks of a tensor that copies it to the CPU (on a GPU: waiting for it)
SYNCING_METHODS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
                   torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__}


class SyncCounter(TorchDispatchMode):
    """Counts, into ``self.step`` (a list, or None between steps), the syncing calls and operations."""

    def __init__(self):
        super().__init__()
        self.step = None
        counter = self

        class Methods(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if counter.step is not None and func in SYNCING_METHODS:
                    counter.step.append(func.__name__)
                return func(*args, **(kwargs or {}))
        self.methods = Methods()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.step is not None and func in SYNCING_OPS:
            self.step.append(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self.methods.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.methods.__exit__(*exc)


@contextlib.contextmanager
def syncs_of_each_step(script: str, monkeypatch, sync_debug=False):
    """[syncs of step 1, of step 2, ...] of the runs of ``script`` inside; a step is what the script's loop
    body does with a batch (making the batch, between steps, is the data pipeline's: on the CPU it reads files
    and indices, which is no sync). ``sync_debug``: on a GPU, also PyTorch's own detector, which raises on a
    sync in the steps that log nothing, and in the making of every batch but an epoch's first (which sets the
    epoch up: its order and augmentation, copied to the GPU once)."""
    module, counter, steps = script_module(script), SyncCounter(), []
    real = module.progress_bar

    def detector(on: bool):
        if sync_debug:
            torch.cuda.set_sync_debug_mode('error' if on else 'default')

    def counted(batches, epoch, done, args):
        batches_of_epoch = iter(real(batches, epoch, done, args))
        for number in itertools.count():
            detector(number > 0)
            try:
                batch = next(batches_of_epoch)
            except StopIteration:
                return
            finally:
                detector(False)
            steps.append([])
            logs = (len(steps) + done) % args.log_interval == 0  # (the run's own step count, not resumed here)
            detector(not logs)
            counter.step = steps[-1]
            yield batch  # the loop body runs now
            counter.step = None
            detector(False)
    monkeypatch.setattr(module, 'progress_bar', counted)
    with counter:
        yield steps


@pytest.fixture(scope='session')
def small_data(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp('small'), per_batch=40, test=40)  # 200 images: 13 steps


STEP_FLAGS = ('--epochs', 1, '--batch-size', 16, '--log-interval', 5, '--device', 'cpu')


@pytest.mark.parametrize('loader, precision, recipe', [
    ('memory', 'fp32', 'tutorial'), ('memory', 'bf16', 'fast'), ('memory', 'fp16', 'fast'),
    ('stream', 'fp32', 'fast'), ('stream', 'fp16', 'tutorial')])
def test_no_step_waits_for_the_device_outside_the_logging_steps(loader, precision, recipe, small_data, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setattr(training.recipe, 'fused_steps', lambda device: True)  # SGD as it runs on a GPU
    with syncs_of_each_step('train_gpu_2.py', monkeypatch) as steps:
        run_main('train_gpu_2.py', *STEP_FLAGS, '--loader', loader, '--precision', precision, '--recipe', recipe,
                 '--data-dir', small_data, cwd=tmp_path)
    assert len(steps) == 13
    for number, syncs in enumerate(steps, start=1):
        if number % 5:
            assert syncs == [], f'step {number}: {syncs}'
        else:  # the mean loss of the last 5 steps, for TensorBoard: the one value a step reads, every 5 steps
            assert syncs == ['item', 'aten._local_scalar_dense.default'], f'step {number}: {syncs}'


def test_the_plain_sgd_under_fp16_waits_every_step(small_data, tmp_path, monkeypatch):
    """Why SGD is fused on a GPU: unfused, fp16's gradient scaler asks for its overflow flag with .item()
    (and this check sees it: the counter is not blind)."""
    monkeypatch.setattr(training.recipe, 'fused_steps', lambda device: False)
    with syncs_of_each_step('train_gpu_2.py', monkeypatch) as steps:
        run_main('train_gpu_2.py', *STEP_FLAGS, '--precision', 'fp16', '--data-dir', small_data, cwd=tmp_path)
    assert all('item' in syncs for syncs in steps) and len(steps) == 13


def test_sgd_is_fused_on_a_gpu_only():
    from argparse import Namespace
    settings = Namespace(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, muon_lr=0)
    assert make_optimizer(MyModel(), settings).defaults['fused'] is None  # the CPU's exact results stay
    assert training.recipe.fused_steps(torch.device('cuda')) and not training.recipe.fused_steps(torch.device('cpu'))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs an NVIDIA GPU')
@pytest.mark.parametrize('loader, precision', [('memory', 'auto'), ('stream', 'auto'), ('memory', 'fp16'),
                                               ('stream', 'fp16'), ('memory', 'fp32')])
def test_on_a_gpu_no_step_syncs_outside_the_logging_steps(loader, precision, small_data, tmp_path, monkeypatch):
    with syncs_of_each_step('train_gpu_2.py', monkeypatch, sync_debug=True) as steps:
        run_main('train_gpu_2.py', *STEP_FLAGS[:-2], '--device', 'cuda', '--loader', loader, '--precision', precision,
                 '--recipe', 'fast', '--data-dir', small_data, cwd=tmp_path)
    assert [number for number, syncs in enumerate(steps, start=1) if syncs] == [5, 10]


# ---------------------------------------------------------------- checkpoints

def test_checkpoints_hold_cpu_tensors_whatever_device_trained(monkeypatch):
    """A model and its optimizer's momentum on a CUDA device (simulated: tensors that carry the device, no data),
    saved as the scripts save them: every tensor of model_{i}.pth, best.pth and last.pth is a CPU one."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from argparse import Namespace
    with torch.device('meta'):
        model = MyModel()  # (no weights drawn: a simulated device has no random numbers to draw them)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device='cuda')
        optimizer = make_optimizer(model, Namespace(lr=0.1, momentum=0.9, nesterov=False, weight_decay=0, muon_lr=0))
        for p in model.parameters():
            optimizer.state[p]['momentum_buffer'] = torch.zeros_like(p)
        assert next(model.parameters()).device.type == 'cuda'
        weights = cpu_weights(model)
        state = training_state(weights, optimizer, Progress(), 0, None, classes=[], config={}, normalize=None)
    tensors = [*weights.values(), *(v for s in state['optimizer']['state'].values() for v in s.values())]
    assert len(tensors) == 10 + 10 and {t.device.type for t in tensors} == {'cpu'}


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs an NVIDIA GPU')
@pytest.mark.parametrize('script, device', [('train_gpu_1.py', ()), ('train_gpu_2.py', ('--device', 'cuda'))])
def test_gpu_scripts_train_on_cuda_and_save_cpu_tensors(script, device, small_data, tmp_path):
    result = run_main(script, *STEP_FLAGS[:-2], *device, '--data-dir', small_data, cwd=tmp_path)
    assert 'training device: cuda' in result.stdout
    for name in ('model_0.pth', 'best.pth', 'last.pth'):
        saved_on = []  # torch.load tells the map_location where each tensor was when it was saved
        torch.load(tmp_path / 'model' / name, weights_only=True,
                   map_location=lambda storage, location: saved_on.append(location) or storage)
        assert set(saved_on) == {'cpu'}, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs an NVIDIA GPU')
@pytest.mark.parametrize('flags, benchmark', [((), True), (('--no-cudnn-benchmark',), False),
                                              (('--deterministic',), False)])
def test_cudnn_autotuning_follows_its_flags_on_a_gpu(flags, benchmark, small_data, tmp_path):
    try:
        run_main('train_gpu_2.py', *STEP_FLAGS[:-2], '--device', 'cuda', *flags, '--data-dir', small_data,
                 cwd=tmp_path)
        assert torch.backends.cudnn.benchmark == benchmark
        assert torch.backends.cudnn.deterministic == ('--deterministic' in flags)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


# ---------------------------------------------------------------- --deterministic, --eval

@pytest.fixture
def deterministic_mode_restored():
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False


def test_deterministic_asks_pytorch_for_it_and_changes_nothing_on_the_cpu(small_data, tmp_path,
                                                                          deterministic_mode_restored):
    flags = (*STEP_FLAGS, '--epochs', 2, '--precision', 'fp32', '--data-dir', small_data)
    run_main('train_gpu_2.py', *flags, '--checkpoint-dir', 'plain', cwd=tmp_path)
    out = run_main('train_gpu_2.py', *flags, '--deterministic', '--epochs', 1, cwd=tmp_path).stdout
    assert torch.are_deterministic_algorithms_enabled() and 'deterministic)' in out.splitlines()[2]
    torch.use_deterministic_algorithms(False)
    run_main('train_gpu_2.py', *flags, '--resume', cwd=tmp_path)  # a resumed run keeps it
    assert torch.are_deterministic_algorithms_enabled()
    assert load_weights(tmp_path / 'model' / 'last.pth')['config']['deterministic'] is True
    assert same_weights(tmp_path / 'model' / 'model_1.pth', tmp_path / 'plain' / 'model_1.pth')


def test_eval_reports_what_training_logged_for_the_same_checkpoint(small_data, tmp_path):
    """Training evaluated under bf16 autocast in batches of 16; --eval does the same, so both say the same."""
    run_main('train.py', *STEP_FLAGS[:-2], '--precision', 'bf16', '--data-dir', small_data, cwd=tmp_path)
    best = load_weights(tmp_path / 'model' / 'best.pth')
    import json
    report = json.loads(run_main('test.py', '--eval', '--checkpoint', tmp_path / 'model' / 'best.pth',
                                 '--data-dir', small_data, '--json', '--device', 'cpu', cwd=tmp_path).stdout)
    assert (report['accuracy'], report['loss']) == (best['test_accuracy'], best['test_loss'])
    assert (report['precision'], report['batch_size'], report['as_trained']) == ('bf16 autocast', 16, True)
    text = run_main('test.py', '--eval', '--checkpoint', tmp_path / 'model' / 'best.pth', '--data-dir', small_data,
                    '--precision', 'fp32', '--device', 'cpu', cwd=tmp_path).stdout
    assert '(fp32, batches of 16)' in text.splitlines()[1]  # asked for another precision: it says which
