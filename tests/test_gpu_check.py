"""gpu_check.py, rehearsed on the CPU with its tiny settings: every step runs the real scripts, so the check
a GPU machine runs in one call cannot rot between the rare times a GPU is lent."""
import json
import os
import time
from pathlib import Path

import pytest
import torch

from conftest import assert_clean_error, posix_only, run_main, run_script, script_module

pytestmark = pytest.mark.skipif(os.environ.get('GPU_CHECK_RUNNING') == '1',
                                reason='gpu_check.py is running this suite: no check inside the check')


def test_the_tiny_check_runs_every_step_and_writes_one_table(tmp_path, capsys):
    """Without --data-dir (as on a lent GPU machine, which has no copy of CIFAR-10): generated data. The check
    itself runs in this process (every step's commands are processes of their own)."""
    assert script_module('gpu_check.py').main(['--out', str(tmp_path / 'out'), '--device', 'cpu']) == 0
    stdout = capsys.readouterr().out
    results = json.loads((tmp_path / 'out' / 'gpu_check.json').read_text())
    text = (tmp_path / 'out' / 'gpu_check.txt').read_text()
    assert stdout.endswith(text)
    assert results['generated_data'] and 'data: generated CIFAR-10-format images' in text
    assert (tmp_path / 'out' / 'data' / 'cifar-10-batches-py' / 'test_batch').is_file()
    live = stdout[:-len(text)]  # each step's rows, printed as it finished
    assert live.index('tests: OK') < live.index('benchmark ...') < live.index('train_gpu_2 default') < \
        live.index('ddp ...')
    assert list(results['steps']) == ['tests', 'benchmark', 'runs', 'ddp']
    assert all(step['ok'] for step in results['steps'].values()), text
    assert results['machine']['torch'] == torch.__version__ and results['tiny'] is True
    assert 'passed' in results['steps']['tests']['summary']
    for row in results['steps']['benchmark']['rows']:
        assert row['train_img_s'] > 0 and row['train_ratio'] > 0
    runs = results['steps']['runs']['runs']
    folders = {'train_gpu_2 default': 'gpu2-default', 'train_gpu_1 1 epoch': 'gpu1-1-epoch',
               'train_gpu_2 fast 5 epochs': 'gpu2-fast'}
    for name, run in runs.items():
        state = torch.load(tmp_path / 'out' / 'runs' / folders[name] / 'model' / 'last.pth', map_location='cpu',
                           weights_only=True)
        assert run['test_accuracy'] == state['test_accuracy'] and run['epochs'] == state['resume']['epoch']
        assert f'{run["test_accuracy"]:.2%}' in text
    assert runs['train_gpu_1 1 epoch']['device'] == ('cuda' if torch.cuda.is_available() else 'cpu')
    answers = runs['train_gpu_2 fast 5 epochs']['classify_on_cpu']['answers']
    assert sorted(answers) == ['cat.jpg', 'dog.png', 'dog_rgba.png']
    assert results['steps']['ddp']['ddp_speed_ratio'] > 0
    ddp_baseline = results['steps']['ddp']['runs']['train_gpu_2']  # the default run, at the same settings
    assert ddp_baseline == {k: v for k, v in runs['train_gpu_2 default'].items() if k != 'classify_on_cpu'}
    assert text.rstrip().endswith('result: all steps OK')
    logs = sorted(p.name for p in (tmp_path / 'out' / 'logs').iterdir())
    assert logs == ['benchmark-128.log', 'benchmark-64.log', 'ddp-1.log', 'gpu1-1-epoch.log', 'gpu2-default.log',
                    'gpu2-fast.log', 'test-gpu2-default.log', 'test-gpu2-fast.log', 'tests.log']


@pytest.mark.parametrize('default_run', [None, {'ok': False}, {'ok': True, 'images_per_second': 200}])
def test_the_ddp_step_trains_its_own_baseline_unless_the_default_run_is_there(default_run, tmp_path, monkeypatch):
    check = gpu_check_for(tmp_path)
    check.default_run, trained = default_run, []

    def train(name, script, *flags, launcher=None):
        trained.append((name, script, *flags))
        return {'ok': True, 'images_per_second': 100 if launcher is None else 50}
    monkeypatch.setattr(check, 'train', train)
    result = check.ddp()
    own_baseline = ('ddp-baseline', 'train_gpu_2.py', '--epochs', '2', '--device', 'cpu')
    assert trained == ([] if default_run and default_run['ok'] else [own_baseline]) + \
        [('ddp-1', 'train_ddp.py', '--epochs', '2', '--device', 'cpu')]
    assert result['ddp_speed_ratio'] == (0.25 if default_run and default_run['ok'] else 0.5)


def test_a_failing_step_is_reported_and_the_exit_code_says_so(cifar_dir, tmp_path, capsys):
    argv = ['--data-dir', str(cifar_dir), '--out', str(tmp_path / 'out'), '--device', 'cpu', '--only', 'tests',
            '--pytest', 'tests/does_not_exist.py']
    assert script_module('gpu_check.py').main(argv) == 1  # the exit code (see its `run(lambda: sys.exit(...))`)
    stdout = capsys.readouterr().out
    assert 'tests: FAILED' in stdout and 'result: FAILED: tests' in stdout


@posix_only  # (process groups)
def test_an_overrunning_step_is_killed_with_every_process_it_started(tmp_path):
    check = gpu_check_for(tmp_path)
    marker = tmp_path / 'grandchild'
    code, output, seconds = check.command('slow', ['sh', '-c', f'sleep 60 & echo $! > {marker}; wait'], timeout=1)
    assert code == 'timeout' and seconds < 10 and 'time limit' in output
    grandchild = int(marker.read_text())
    for _ in range(100):  # a SIGKILL takes a moment to land
        if not alive(grandchild):
            break
        time.sleep(0.05)
    assert not alive(grandchild)  # as torchrun's workers, which would keep the GPU


def test_a_step_out_of_time_or_broken_leaves_the_table_readable(tmp_path, monkeypatch):
    check = gpu_check_for(tmp_path)
    gpu_check = script_module('gpu_check.py')
    monkeypatch.setattr(check, 'benchmark', lambda: 1 / 0)  # a bug in the check itself
    check.record('benchmark', gpu_check.run_step(check, 'benchmark'))
    check.deadline = time.monotonic()  # the budget is spent
    check.record('runs', gpu_check.run_step(check, 'runs'))
    text = (tmp_path / 'gpu_check.txt').read_text()
    assert 'benchmark: FAILED — ZeroDivisionError: division by zero' in text
    assert 'runs: skipped — not run: the --budget was used up' in text
    assert text.rstrip().endswith('result: FAILED: benchmark, runs')


def gpu_check_for(out):
    from argparse import Namespace
    args = Namespace(out=out, tiny=True, budget=60, device='cpu', data_dir=out, generated=False)
    return script_module('gpu_check.py').Check(args)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a dead child that nobody has reaped yet)."""
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


def test_bad_arguments_are_one_line(tmp_path):
    result = run_script('gpu_check.py', '--data-dir', tmp_path / 'none', '--out', tmp_path, cwd=tmp_path, check=False)
    assert_clean_error(result, '--data-dir', 'is not a folder', 'leave --data-dir out')
    result = run_main('gpu_check.py', '--data-dir', tmp_path, '--out', tmp_path, '--only', 'bogus', cwd=tmp_path,
                      check=False)  # (in this process: the same handler turns it into one line)
    assert_clean_error(result, '--only bogus')
