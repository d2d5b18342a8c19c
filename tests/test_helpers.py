"""The helpers the training scripts call, one by one: what a failure here points at is that helper."""
import errno
import os
import re
import threading
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import CLASSES, project_at, working_directory
from model import MyModel
from training.checkpoint import load_checkpoint, read_training_state
from training.device import Autocast
from training.errors import Diverged, UserError
from training.folders import LOCK_FILE, CheckpointFolder, new_run_dir, take_lock
from training.meters import TestMeter, TrainMeter
from training.progress import Progress, restore
from training.recipe import clip_gradients, make_optimizer, set_learning_rate
from training.settings import training_settings
from training.tblog import RunLog

CPU = torch.device('cpu')


def sgd(model):
    """The project's SGD with momentum, so that a restored optimizer has momentum buffers to compare."""
    return make_optimizer(model, Namespace(lr=0.1, momentum=0.9, nesterov=False, weight_decay=0, muon_lr=0))


def settings(*argv, epochs=10):
    return training_settings([str(a) for a in argv], 'train.py', '', epochs=epochs)[0]


# ---------------------------------------------------------------- the step and its sums

def batch(loss: float, predictions, targets):
    """A step's mean loss and outputs whose argmax is ``predictions``."""
    outputs = torch.nn.functional.one_hot(torch.tensor(predictions), 3).float()
    return torch.tensor(loss), outputs, torch.tensor(targets)


def test_train_meter_logs_the_mean_of_the_steps_since_the_last_log():
    meter = TrainMeter(CPU)
    for loss in (1.0, 2.0, 3.0):
        meter.add(*batch(loss, [0, 1], [0, 0]))
    assert meter.window_loss(step=3) == pytest.approx(2.0)
    meter.add(*batch(5.0, [2, 2], [2, 1]))  # one step since then, not --log-interval of them
    assert meter.window_loss(step=4) == pytest.approx(5.0)
    assert meter.window_loss(step=4) == 0.0  # (no step since the last log)
    meter.add(*batch(7.0, [1], [1]))  # a last batch of one image
    assert meter.window_loss(step=5) == pytest.approx(7.0)
    result = meter.result(step=4)
    assert (result.loss, result.accuracy, result.images) == (pytest.approx(29 / 9), 5 / 9, 9)  # 1 right a step
    assert meter.batches == 5


def test_the_meters_of_an_epoch_of_one_image():
    train, test = TrainMeter(CPU), TestMeter(CPU)
    train.add(*batch(0.5, [1], [1]))
    test.add(torch.tensor(0.25), torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([1]))
    results = train.result(step=1), test.result()
    assert [(r.loss, r.accuracy, r.images) for r in results] == [(0.5, 1.0, 1), (0.25, 1.0, 1)]
    assert results[1].probabilities is None  # kept only when asked for (the PR curves): not the whole test set


def test_the_sums_stay_on_the_device_the_steps_ran_on():
    """No sum is copied to the CPU while an epoch runs (each copy would make the CPU wait for the GPU). PyTorch's
    'meta' device stands in for a GPU: its tensors have a device but no values."""
    meta = torch.device('meta')
    train, test = TrainMeter(meta, {'loss_sum': 2.0, 'window_sum': 1.0, 'correct': 1, 'seen': 2, 'batches': 1}), \
        TestMeter(meta)
    outputs, targets = torch.zeros(2, 3, device=meta), torch.zeros(2, dtype=torch.long, device=meta)
    train.add(torch.tensor(1.0, device=meta), outputs, targets)
    test.add(torch.tensor(1.0, device=meta), outputs, targets)
    sums = [train.loss_sum, train.window_sum, train.correct, test.loss_sum, test.correct, test.confusion]
    assert [t.device for t in sums] == [meta] * 6


def test_train_meter_continues_from_its_saved_state():
    whole, first = TrainMeter(CPU), TrainMeter(CPU)
    steps = [batch(float(k), [k % 3, 0], [0, 1]) for k in range(5)]
    for step in steps:
        whole.add(*step)
    for step in steps[:3]:
        first.add(*step)
    second = TrainMeter(CPU, first.state_dict())  # as after an interruption and --resume
    for step in steps[3:]:
        second.add(*step)
    assert second.state_dict() == whole.state_dict()
    assert second.window_loss(5) == whole.window_loss(5)


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_a_loss_that_is_not_finite_stops_training(bad):
    meter = TrainMeter(CPU)
    meter.add(*batch(bad, [0], [0]))
    with pytest.raises(Diverged, match=f'the loss became {bad} at step 1 .*--lr'):
        meter.window_loss(step=1)
    with pytest.raises(Diverged, match=f'the loss became {bad} at step 7 .*--lr'):
        meter.result(step=7)


@pytest.fixture
def two_processes(monkeypatch):
    """The meters in a pretend run of two processes (train_ddp.py) whose other process saw exactly what this
    one did: each sum over the processes doubles, each gathered tensor comes twice. ``.rank``: this one's."""
    import training.meters as meters
    world = Namespace(rank=0)
    monkeypatch.setattr(meters, 'world_size', lambda: 2)
    monkeypatch.setattr(meters, 'is_main_process', lambda: world.rank == 0)
    monkeypatch.setattr(meters, 'sum_over_processes', lambda values: values * 2)
    monkeypatch.setattr(meters, 'gather_from_processes', lambda tensor: torch.cat([tensor.cpu(), tensor.cpu()]))
    return world


def test_totals_over_processes_are_sums_and_counts_stay_whole_numbers(two_processes):
    from training.meters import totals
    summed = totals(torch.tensor(1.25), torch.tensor(3), 4)
    assert summed == [2.5, 6, 8] and [type(x) for x in summed] == [float, int, int]
    assert totals(2, 5) == [4, 10]  # no tensor to take the device from: summed on the CPU


def test_totals_go_to_the_other_processes_from_the_device_of_the_sums(two_processes, monkeypatch):
    """NCCL adds up GPU tensors only: the counts kept as Python numbers join the sums on their device ('meta'
    stands in for a GPU)."""
    import training.meters as meters
    devices = []
    monkeypatch.setattr(meters, 'sum_over_processes', lambda values: devices.append(values.device) or
                        torch.zeros(values.shape, dtype=values.dtype))
    meters.totals(torch.tensor(1.0, device='meta'), 4)
    assert devices == [torch.device('meta')]


def test_train_meter_over_two_processes_reports_the_whole_global_batches(two_processes):
    meter = TrainMeter(CPU)
    meter.add(*batch(1.0, [0, 1], [0, 0]))
    meter.add(*batch(4.0, [2, 2], [2, 1]))
    assert meter.window_loss(step=2) == pytest.approx(2.5)  # per image, over both processes' images
    result = meter.result(step=2)
    assert (result.loss, result.accuracy, result.images) == (pytest.approx(2.5), 0.5, 8)
    assert meter.state_dict() == {'loss_sum': 20.0, 'window_sum': 0.0, 'correct': 4, 'seen': 8, 'batches': 2,
                                  'window_images': 0}


def test_a_resumed_epoch_carries_on_its_sums_in_the_first_process_only(two_processes):
    """last.pth holds the sums of all processes: rank 0 continues them, the others start from zero (else they
    would be counted once per process), and every process keeps the count of batches done."""
    saved = {'loss_sum': 12.0, 'window_sum': 3.0, 'correct': 5, 'seen': 8, 'batches': 2, 'window_images': 2}
    assert TrainMeter(CPU, saved).state_dict() == {key: 2 * value for key, value in saved.items()
                                                   if key != 'batches'} | {'batches': 2}
    two_processes.rank = 1
    assert TrainMeter(CPU, saved).state_dict() == {'loss_sum': 0.0, 'window_sum': 0.0, 'correct': 0, 'seen': 0,
                                                   'batches': 2, 'window_images': 0}
    assert TrainMeter(CPU).state_dict()['batches'] == 0  # a new epoch


def test_test_meter_over_two_processes_counts_both_processes_images(two_processes):
    outputs, targets = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), torch.tensor([0, 0, 0])
    meter = TestMeter(CPU, keep_outputs=True)
    meter.add(torch.tensor(1.5), outputs, targets)
    result = meter.result()
    assert (result.loss, result.accuracy, result.images) == (0.5, 2 / 3, 6)
    assert result.confusion.tolist() == [[4, 2], [0, 0]]
    assert torch.equal(result.probabilities, torch.cat([outputs.softmax(1)] * 2))
    assert result.targets.tolist() == [0] * 6


def test_test_meter_sums_loss_per_image_and_builds_the_confusion_matrix():
    torch.manual_seed(0)
    outputs, targets = torch.randn(50, 4), torch.randint(0, 4, (50,))
    meter, loss_fn = TestMeter(CPU, keep_outputs=True), nn.CrossEntropyLoss(reduction='sum')
    for chunk in range(0, 50, 16):  # batches of 16, 16, 16, 2
        meter.add(loss_fn(outputs[chunk:chunk + 16], targets[chunk:chunk + 16]), outputs[chunk:chunk + 16],
                  targets[chunk:chunk + 16])
    result = meter.result()
    assert result.loss == pytest.approx(nn.functional.cross_entropy(outputs, targets).item())
    assert result.accuracy == (outputs.argmax(1) == targets).sum().item() / 50
    expected = torch.bincount(targets * 4 + outputs.argmax(1), minlength=16).view(4, 4)
    assert torch.equal(result.confusion, expected)
    assert torch.allclose(result.probabilities, outputs.softmax(1)) and torch.equal(result.targets, targets)


def test_gradient_clipping_and_the_learning_rate():
    model = MyModel()
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    before = [p.grad.clone() for p in model.parameters()]
    clip_gradients(model, 0)  # off: untouched
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))
    clip_gradients(model, 2.0)
    assert torch.cat([p.grad.flatten() for p in model.parameters()]).norm() == pytest.approx(2.0, rel=1e-4)
    optimizer = make_optimizer(model, Namespace(lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4, muon_lr=0))
    set_learning_rate(optimizer, 0.025)
    assert [g['lr'] for g in optimizer.param_groups] == [0.025, 0.025]  # weights and biases alike


def test_autocast_is_bf16_only_when_asked_or_native():
    assert Autocast('fp32', CPU).dtype is None
    with Autocast('fp32', CPU)():
        assert not torch.is_autocast_enabled('cpu')
    with Autocast('bf16', CPU)():
        assert torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


# ---------------------------------------------------------------- settings

def test_settings_are_resolved_once_and_read_only():
    args = settings('--recipe', 'fast', '--lr', 0.02)
    assert (args.lr, args.momentum, args.checkpoint_dir, args.log_dir, args.script) == \
        (0.02, 0.9, 'model', 'logs', 'train.py')  # the flag, then the recipe, then the default folders
    with pytest.raises(AttributeError, match='read-only'):
        args.lr = 1.0
    dry = settings('--dry-run', '--epochs', 30)
    assert dry.epochs == 2 and 'dry-run-' in dry.checkpoint_dir and 'dry-run-' in dry.log_dir


def test_resume_reads_last_pth_once_and_takes_its_settings(tmp_path):
    model = MyModel()
    state = {'format': 'mymodel-checkpoint-v1', 'model': model.state_dict(), 'classes': CLASSES,
             'config': {**vars(settings('--lr', 0.03, '--seed', 4)), 'epochs': 10},
             'resume': {'epoch': 3, 'meter': None}}
    torch.save(state, tmp_path / 'last.pth')
    args, resumed = training_settings(['--resume', '--checkpoint-dir', str(tmp_path), '--lr', '0.5'], 'train.py', '',
                                      epochs=10)
    assert (args.lr, args.seed) == (0.03, 4) and resumed['path'] == str(tmp_path / 'last.pth')
    assert resumed['model']['model.0.weight'].device.type == 'cpu'
    # the run goes on to its own last epoch, not to the script's default; --epochs N: on to N
    state['config']['epochs'] = 4
    torch.save(state, tmp_path / 'last.pth')
    assert training_settings(['--resume', '--checkpoint-dir', str(tmp_path)], 'train.py', '', epochs=10)[0].epochs == 4
    longer = training_settings(['--resume', '--checkpoint-dir', str(tmp_path), '--epochs', '12'], 'train.py', '', 10)
    assert longer[0].epochs == 12
    assert settings().epochs == 10 and settings('--epochs', 3).epochs == 3  # without --resume: as before


def test_restore_puts_weights_optimizer_and_random_state_back(tmp_path):
    torch.manual_seed(1)
    model = MyModel()
    optimizer = sgd(model)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # momentum buffers now exist
    random_state = torch.get_rng_state()
    progress = Progress(step=17, epoch=2, meter={'batches': 3}, run_dir=str(tmp_path / 'run'))
    with CheckpointFolder(settings('--checkpoint-dir', tmp_path / 'model'), CLASSES, None) as folder:
        folder.save_last(model, optimizer, progress)
    resumed = read_training_state(str(tmp_path / 'model' / 'last.pth'), tmp_path)
    torch.manual_seed(99)
    fresh = MyModel()
    fresh_optimizer = sgd(fresh)
    restored = restore(resumed, fresh, fresh_optimizer, CLASSES)
    assert (restored.step, restored.epoch, restored.run_dir) == (17, 2, str(tmp_path / 'run'))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert torch.equal(fresh_optimizer.state_dict()['state'][0]['momentum_buffer'],
                       optimizer.state_dict()['state'][0]['momentum_buffer'])
    assert torch.equal(torch.get_rng_state(), random_state)
    with pytest.raises(UserError, match='other classes'):
        restore(resumed, fresh, fresh_optimizer, ['cat', 'dog'])


# ---------------------------------------------------------------- folders and files

def test_checkpoint_loading_tells_the_formats_apart(tmp_path):
    torch.save(MyModel().state_dict(), tmp_path / 'plain.pth')
    assert load_checkpoint(tmp_path / 'plain.pth')['classes'] is None
    with pytest.raises(UserError, match='no training state'):
        read_training_state(str(tmp_path / 'plain.pth'), tmp_path)
    with pytest.raises(UserError, match='nothing to resume'):
        read_training_state('latest', tmp_path)


def test_a_run_folder_is_always_new(tmp_path):
    assert new_run_dir(tmp_path, 'run', 'train.py').name == 'run'
    assert new_run_dir(tmp_path, 'run', 'train.py').name == 'run-2'
    made, start = [], threading.Barrier(8)

    def make():
        start.wait()
        made.append(new_run_dir(tmp_path, 'race', 'train.py'))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(p.name for p in made) == sorted(['race'] + [f'race-{n}' for n in range(2, 9)])
    (tmp_path / 'file').write_text('not a folder')
    with pytest.raises(OSError):
        new_run_dir(tmp_path / 'file', None, 'train.py')


def test_a_run_without_a_name_is_named_by_its_start_and_script_in_a_log_folder_made_for_it(tmp_path):
    import re
    made = new_run_dir(tmp_path / 'new' / 'logs', None, 'train_gpu_2.py')
    assert made.is_dir() and made.parent == tmp_path / 'new' / 'logs'
    assert re.fullmatch(r'20\d{6}-\d{6}-train_gpu_2', made.name), made.name


def test_a_checkpoint_folder_has_one_owner_at_a_time(tmp_path):
    first = take_lock(tmp_path / LOCK_FILE, 'pid 123, train.py, started today')
    second = attempt_to_take(tmp_path / LOCK_FILE)
    assert second, 'a second run waited for the lock instead of saying who holds it'
    assert isinstance(second[0], UserError)
    assert re.search(r'in use by another training run \(pid 123, train.py.*--checkpoint-dir', str(second[0]))
    first.close()  # what the operating system does when the process ends, even by kill -9
    take_lock(tmp_path / LOCK_FILE, 'pid 456').close()


def attempt_to_take(path) -> list:
    """take_lock(path) in a thread, given 10 s: [] if it was still waiting, else [what it raised, or None]."""
    outcome = []

    def attempt():
        try:
            take_lock(path, 'pid 456').close()
            outcome.append(None)
        except Exception as e:
            outcome.append(e)
    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=10)
    return outcome


def test_a_run_that_took_the_folder_but_has_not_said_who_it_is_yet_is_waited_for_a_moment(tmp_path):
    from training.platforms import lock_file
    path = tmp_path / LOCK_FILE
    with open(path, 'a+') as holder:
        lock_file(holder, wait=False)  # taken, its name not written (yet)
        outcome = attempt_to_take(path)
        assert outcome, 'a second run waited for good'
        assert isinstance(outcome[0], UserError) and '(just started)' in str(outcome[0])
        threading.Timer(0.3, lambda: (holder.write('pid 123, train.py\n'), holder.flush())).start()
        outcome = attempt_to_take(path)
        assert isinstance(outcome[0], UserError) and '(pid 123, train.py)' in str(outcome[0])
    assert attempt_to_take(path) == [None]


def test_the_lock_file_gets_the_permissions_of_any_file_the_user_makes(tmp_path):
    old = os.umask(0)  # every permission bit shows
    try:
        take_lock(tmp_path / LOCK_FILE, 'pid 123').close()
        (tmp_path / 'plain.txt').write_text('made by open()')
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / LOCK_FILE).st_mode) == oct(os.stat(tmp_path / 'plain.txt').st_mode)  # not executable


def test_taking_a_checkpoint_folder_clears_what_a_killed_run_left_and_nothing_else(tmp_path):
    folder = tmp_path / 'model'
    folder.mkdir()
    left = [folder / '.model_3.pth.k2j4x.tmp', folder / '.last.pth.8f7a.tmp']  # a save cut off by kill -9
    kept = [folder / 'model_2.pth', folder / 'notes.tmp', folder / '.model_2.pth']
    for path in left + kept:
        path.write_bytes(b'x')
    with CheckpointFolder(settings('--checkpoint-dir', folder), CLASSES, None):
        assert not any(path.exists() for path in left) and all(path.exists() for path in kept)
        assert (folder / LOCK_FILE).read_text().startswith(f'pid {os.getpid()}, train.py, started ')
    assert sorted(p.name for p in folder.iterdir()) == sorted([LOCK_FILE] + [p.name for p in kept])


def test_a_new_checkpoint_folder_is_made_with_its_parents_and_holds_only_the_lock(tmp_path):
    folder = tmp_path / 'runs' / 'a' / 'model'
    with CheckpointFolder(settings('--checkpoint-dir', folder), CLASSES, None):
        assert [p.name for p in folder.iterdir()] == [LOCK_FILE]  # (the check that it can be written is gone)
    with CheckpointFolder(settings('--checkpoint-dir', folder), CLASSES, None):  # and once more, as it now is
        assert [p.name for p in folder.iterdir()] == [LOCK_FILE]


def test_an_epochs_three_files_copy_the_weights_off_the_device_once(tmp_path, monkeypatch):
    """model_{i}.pth, best.pth and last.pth hold the same weights, copied off the device once (each copy makes the
    CPU wait for the GPU), then written from that copy."""
    import training.folders
    copies = []
    monkeypatch.setattr(training.folders, 'cpu_weights', lambda model: copies.append(model) or
                        {k: v.clone() for k, v in model.state_dict().items()})
    model = MyModel()
    progress = Progress(step=5, epoch=1, best={'accuracy': 0.5, 'epoch': 0})
    with CheckpointFolder(settings('--checkpoint-dir', tmp_path), CLASSES, None) as folder:
        folder.save_epoch(0, model, sgd(model), progress)
    assert copies == [model]
    assert sorted(p.name for p in tmp_path.glob('*.pth')) == ['best.pth', 'last.pth', 'model_0.pth']


def test_a_checkpoint_folder_that_cannot_be_made_is_one_line_before_training(tmp_path):
    (tmp_path / 'a file').write_text('not a folder')
    with pytest.raises(UserError, match=r'cannot write checkpoints to .*a file.*model/ \(.*\); choose another '
                                        r'--checkpoint-dir'):
        CheckpointFolder(settings('--checkpoint-dir', tmp_path / 'a file' / 'model'), CLASSES, None).__enter__()


@pytest.mark.skipif(not Path('/sys/kernel').is_dir(), reason="Linux's /sys: a folder that even root cannot write into")
def test_a_checkpoint_folder_that_exists_but_cannot_be_written_is_one_line_before_training():
    with pytest.raises(UserError, match=r'^cannot write checkpoints to /sys/kernel/ \(Permission denied\); choose '
                                        r'another --checkpoint-dir$'):
        CheckpointFolder(settings('--checkpoint-dir', '/sys/kernel'), CLASSES, None).__enter__()


def test_a_checkpoint_keeps_the_runs_settings_that_a_weights_only_load_can_read(tmp_path):
    from training.folders import config_of
    args = Namespace(lr=0.05, epochs=3, precision='fp32', flip=True, resume=None, data_dir=Path('cifar'),
                     milestones=[10, 20])
    torch.save(vars(args), tmp_path / 'all.pth')
    with pytest.raises(Exception, match='weights_only'):  # a Path is not among what weights_only may load
        torch.load(tmp_path / 'all.pth', weights_only=True)
    torch.save(config_of(args), tmp_path / 'config.pth')
    assert torch.load(tmp_path / 'config.pth', weights_only=True) == {'lr': 0.05, 'epochs': 3, 'precision': 'fp32',
                                                                      'flip': True, 'resume': None}


def test_the_resume_command_names_what_differs_from_the_projects_own_folders(tmp_path, monkeypatch):
    import training.folders
    with working_directory(tmp_path), project_at(tmp_path):
        own = CheckpointFolder(settings(), CLASSES, None)
        assert own.resume_command() == 'python train.py --resume'
        assert own.resume_hint(12) == (f'interrupted: training state saved in {Path("model", "last.pth")} (step 12); '
                                       'continue with: python train.py --resume')
        elsewhere = CheckpointFolder(settings('--checkpoint-dir', 'runs', '--data-dir', 'cifar'), CLASSES, None)
        assert elsewhere.resume_command() == 'python train.py --resume --checkpoint-dir runs --data-dir cifar'
        monkeypatch.setattr(training.folders, 'world_size', lambda: 2)  # as in train_ddp.py under torchrun
        assert own.resume_command() == 'torchrun --standalone --nproc-per-node=2 train.py --resume'


@pytest.mark.parametrize('failure, message', [
    (OSError(errno.ENOSPC, 'No space left on device'),
     r'cannot write .*best.pth \(No space left on device\); free some space or choose another --checkpoint-dir'),
    (OSError('the disk went away'), r'cannot write .*best.pth \(the disk went away\)'),
    (None, r'cannot replace .*best.pth: another program is using it .* for 5s; close that program, then resume'),
])
def test_a_checkpoint_that_cannot_be_written_is_one_line_saying_what_to_do(tmp_path, monkeypatch, failure,
                                                                          message):
    import training.checkpoint
    from training.checkpoint import save_checkpoint
    from training.platforms import FileInUse

    def atomic_save(obj, path):
        raise failure or FileInUse(errno.EACCES, 'Access is denied')
    monkeypatch.setattr(training.checkpoint, 'atomic_save', atomic_save)
    with pytest.raises(UserError, match=message):
        save_checkpoint({}, tmp_path / 'best.pth', 'resume')


def test_a_failed_save_says_to_resume_once_last_pth_holds_the_run(tmp_path, monkeypatch):
    import training.checkpoint
    from training.platforms import FileInUse
    model = MyModel()
    with working_directory(tmp_path), project_at(tmp_path), \
            CheckpointFolder(settings(), CLASSES, None) as folder:
        real_save = training.checkpoint.atomic_save

        def held_open(obj, path):
            raise FileInUse(errno.EACCES, 'Access is denied')
        monkeypatch.setattr(training.checkpoint, 'atomic_save', held_open)
        with pytest.raises(UserError, match='close that program, then start the run again$'):
            folder.save({}, folder.path / 'model_0.pth')  # nothing to resume yet
        monkeypatch.setattr(training.checkpoint, 'atomic_save', real_save)
        folder.save_last(model, sgd(model), Progress())
        monkeypatch.setattr(training.checkpoint, 'atomic_save', held_open)
        with pytest.raises(UserError, match=r'then continue with: python train.py --resume \(model.last.pth is '
                                            r'complete\)$'):
            folder.save({}, folder.path / 'model_0.pth')


def test_tensorboard_write_errors_become_one_clear_line(tmp_path, monkeypatch):
    args = settings('--log-dir', tmp_path / 'logs', '--run-name', 'r')
    with RunLog(args, Progress(), CLASSES) as writer:
        writer.add_scalar('test_accuracy', 0.5, 0)

        def full_disk(*a, **k):
            raise OSError(errno.ENOSPC, 'No space left on device')

        monkeypatch.setattr(writer.writer, 'add_scalar', full_disk)
        with pytest.raises(UserError, match='cannot write TensorBoard logs .*No space left.*--log-dir'):
            writer.add_scalar('test_accuracy', 0.6, 1)
        monkeypatch.undo()
    (tmp_path / 'a-file').write_text('not a folder')
    with pytest.raises(UserError, match='cannot write TensorBoard logs to .*a-file'):
        RunLog(settings('--log-dir', tmp_path / 'a-file'), Progress(), CLASSES)


def test_other_errors_are_not_blamed_on_tensorboard(tmp_path):
    with pytest.raises(BrokenPipeError):
        with RunLog(settings('--log-dir', tmp_path / 'logs'), Progress(), CLASSES):
            raise BrokenPipeError(errno.EPIPE, 'Broken pipe')  # e.g. print() into a closed pipe


def last_pth(tmp_path) -> dict:
    """A last.pth written by the real CheckpointFolder, read back as --resume reads it."""
    model = MyModel()
    optimizer = sgd(model)
    with CheckpointFolder(settings('--checkpoint-dir', tmp_path / 'model'), CLASSES, None) as folder:
        folder.save_last(model, optimizer, Progress(step=3, run_dir=str(tmp_path)))
    return read_training_state(str(tmp_path / 'model' / 'last.pth'), tmp_path)


def test_resume_restores_random_states_from_cpu_tensors_on_any_device(tmp_path, monkeypatch):
    """torch.set_rng_state takes only a CPU ByteTensor: --resume reads last.pth onto the CPU whatever the
    training device (the weights reach the device when they are copied into the model)."""
    locations = []
    real_load = torch.load
    monkeypatch.setattr(torch, 'load', lambda *a, **k: locations.append(k.get('map_location')) or real_load(*a, **k))
    resumed = last_pth(tmp_path)
    assert locations == ['cpu'] and resumed['rng']['torch'].device.type == 'cpu'
    given = []
    monkeypatch.setattr(torch, 'set_rng_state', lambda state: given.append((state.device.type, state.dtype)))
    model = MyModel()
    restore(resumed, model, sgd(model),
            CLASSES)
    assert given == [('cpu', torch.uint8)]


def test_resume_on_a_machine_with_fewer_gpus(tmp_path, monkeypatch):
    """last.pth from a machine with two GPUs holds two CUDA generator states; a machine with one restores
    the one it has instead of failing on the second."""
    resumed = last_pth(tmp_path)
    resumed['rng']['cuda'] = [torch.get_rng_state(), torch.get_rng_state()]  # as saved on two GPUs
    restored = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)

    def set_rng_state(state, device='cuda'):  # what the real one does with a GPU that is not there
        if device not in (0, 'cuda', 'cuda:0'):
            raise RuntimeError(f'CUDA error: invalid device ordinal {device}')
        restored.append(device)

    monkeypatch.setattr(torch.cuda, 'set_rng_state', set_rng_state)
    monkeypatch.setattr(torch.cuda, 'set_rng_state_all', lambda states: [set_rng_state(s, i) for i, s in
                                                                         enumerate(states)])
    model = MyModel()
    restore(resumed, model, sgd(model),
            CLASSES)
    assert restored == [0]


@pytest.mark.parametrize('run_dir', ['logs/run', None])  # None: saved before its TensorBoard folder was made
def test_resume_continues_from_where_last_pth_says(tmp_path, run_dir):
    """Every figure of the run's progress that last.pth saves comes back as it was saved."""
    model = MyModel()
    saved = Progress(step=7, epoch=3, best={'accuracy': 0.5, 'epoch': 1},
                     last_test={'epoch': 2, 'test_accuracy': 0.25, 'test_loss': 1.5},
                     run_dir=run_dir and str(tmp_path / run_dir))
    with CheckpointFolder(settings('--checkpoint-dir', tmp_path / 'model'), CLASSES, None) as folder:
        folder.save_last(model, sgd(model), saved)
    resumed = read_training_state(str(tmp_path / 'model' / 'last.pth'), tmp_path)
    progress = restore(resumed, model, sgd(model), CLASSES)
    assert (progress.step, progress.epoch, progress.best, progress.last_test) == \
        (7, 3, {'accuracy': 0.5, 'epoch': 1}, {'epoch': 2, 'test_accuracy': 0.25, 'test_loss': 1.5})
    assert progress.run_dir == (run_dir and str(tmp_path / run_dir))
    assert progress.resumed_from == str(tmp_path / 'model' / 'last.pth')


def test_a_saved_loss_scale_is_ignored_by_a_resume_without_a_scaler(tmp_path):
    resumed = last_pth(tmp_path)
    resumed['scaler'] = {'scale': 1024.0, 'growth_factor': 2.0, 'backoff_factor': 0.5, 'growth_interval': 2000,
                         '_growth_tracker': 0}  # as an fp16 run saves it
    model = MyModel()
    assert restore(resumed, model, sgd(model), CLASSES).scaler is None


def test_last_pth_keeps_each_gpus_random_state_and_resume_puts_each_back(tmp_path, monkeypatch):
    """On a machine with two GPUs, last.pth holds both CUDA generator states, and --resume restores each
    into its own GPU, so that a resumed run draws the same random numbers there as an uninterrupted one."""
    states = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    restored = {}
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'get_rng_state_all', lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda state, device: restored.update({device: state}))
    resumed = last_pth(tmp_path)
    assert [s.tolist() for s in resumed['rng']['cuda']] == [s.tolist() for s in states]
    model = MyModel()
    restore(resumed, model, sgd(model), CLASSES)
    assert {i: s.tolist() for i, s in restored.items()} == {0: states[0].tolist(), 1: states[1].tolist()}


def test_resume_keeps_this_machines_way_of_stepping(tmp_path):
    """A last.pth from a GPU run whose SGD was fused (and ran for each parameter list at once) continues on a
    CPU with the CPU's own kind of steps: how the optimizer steps is not part of the state it resumes."""
    resumed = last_pth(tmp_path)
    for group in resumed['optimizer']['param_groups']:
        group.update(fused=True, foreach=True)  # as saved on the GPU
    model = MyModel()
    optimizer = sgd(model)
    here = [(g['fused'], g['foreach']) for g in optimizer.param_groups]
    restore(resumed, model, optimizer, CLASSES)
    assert [(g['fused'], g['foreach']) for g in optimizer.param_groups] == here != [(True, True)] * len(here)


def test_a_mismatch_names_at_most_four_keys_of_each_kind():
    from training.checkpoint import mismatch
    weights = MyModel().state_dict()
    del weights['model.8.bias']
    weights['model.0.weight'] = torch.zeros(16, 3, 5, 5)
    for k in range(4):
        weights[f'extra.{k}'] = torch.zeros(1)
    assert mismatch(MyModel(), weights) == ('missing keys: model.8.bias; unexpected keys: extra.0, extra.1, extra.2, '
                                            'extra.3; shapes differ (checkpoint vs model): model.0.weight '
                                            '[16, 3, 5, 5] vs [32, 3, 5, 5]')
    weights['extra.4'] = torch.zeros(1)
    assert 'unexpected keys: extra.0, extra.1, extra.2, extra.3 ...; shapes' in mismatch(MyModel(), weights)
    assert mismatch(MyModel(), MyModel().state_dict()) is None


def test_classes_without_names_are_numbered():
    from training.checkpoint import class_names
    assert class_names({'classes': None}, 3) == ['class 0', 'class 1', 'class 2']
    assert class_names({'classes': None}, 10)[:2] == ['airplane', 'automobile']  # a plain 10-class one: CIFAR-10
    assert class_names({'classes': ('cat', 'dog')}, 2) == ['cat', 'dog']


def test_resume_from_the_last_pth_of_another_network_is_one_line_naming_the_keys(tmp_path):
    resumed = last_pth(tmp_path)
    resumed['model']['model.8.weight'] = torch.zeros(10, 32)  # (another Linear at the end)
    model = MyModel()
    with pytest.raises(UserError, match=r'does not fit this model \(shapes differ.*model\.8\.weight \[10, 32\]'):
        restore(resumed, model, sgd(model), CLASSES)


def test_one_at_a_time_makes_the_second_process_wait_until_the_first_is_done(tmp_path):
    """The lock around the CIFAR-10 download and the decode cache (an OS lock per open file, so two
    threads with their own opens contend as two processes do)."""
    import threading
    from training.files import one_at_a_time
    order = []

    def second():
        with one_at_a_time(tmp_path / '.lock'):
            order.append('second')

    with one_at_a_time(tmp_path / '.lock'):
        waiting = threading.Thread(target=second)
        waiting.start()
        waiting.join(timeout=0.5)
        assert waiting.is_alive()  # still waiting for the lock
        order.append('first')
    waiting.join(timeout=10)
    assert order == ['first', 'second']
