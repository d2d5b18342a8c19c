"""gpu_check.py, rehearsed on the CPU with its tiny settings: every step runs the real scripts, so the check
a GPU machine runs in one call cannot rot between the rare times a GPU is lent."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_clean_error, run_script

pytestmark = pytest.mark.skipif(os.environ.get('GPU_CHECK_RUNNING') == '1',
                                reason='gpu_check.py is running this suite: no check inside the check')


def test_the_tiny_check_runs_every_step_and_writes_one_table(cifar_dir, tmp_path):
    result = run_script('gpu_check.py', '--data-dir', cifar_dir, '--out', tmp_path / 'out', '--device', 'cpu',
                        cwd=tmp_path, timeout=400)
    results = json.loads((tmp_path / 'out' / 'gpu_check.json').read_text())
    text = (tmp_path / 'out' / 'gpu_check.txt').read_text()
    assert result.stdout.endswith(text)
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
        state = torch.load(tmp_path / 'out' / 'runs' / folders[name] / 'model' / 'last.pth', weights_only=True)
        assert run['test_accuracy'] == state['test_accuracy'] and run['epochs'] == state['resume']['epoch']
        assert f'{run["test_accuracy"]:.2%}' in text
    assert runs['train_gpu_1 1 epoch']['device'] == ('cuda' if torch.cuda.is_available() else 'cpu')
    answers = runs['train_gpu_2 fast 5 epochs']['classify_on_cpu']['answers']
    assert sorted(answers) == ['cat.jpg', 'dog.png', 'dog_rgba.png']
    assert results['steps']['ddp']['ddp_speed_ratio'] > 0
    assert text.rstrip().endswith('result: all steps OK')
    logs = sorted(p.name for p in (tmp_path / 'out' / 'logs').iterdir())
    assert logs[:2] == ['benchmark-128.log', 'benchmark-64.log']


def test_a_failing_step_is_reported_and_the_exit_code_says_so(cifar_dir, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / 'gpu_check.py'), '--data-dir', cifar_dir, '--out',
                             tmp_path / 'out', '--device', 'cpu', '--only', 'tests',
                             '--pytest', 'tests/does_not_exist.py'], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert 'tests: FAILED' in result.stdout and 'result: FAILED: tests' in result.stdout


def test_bad_arguments_are_one_line(tmp_path):
    result = run_script('gpu_check.py', '--data-dir', tmp_path / 'none', '--out', tmp_path, cwd=tmp_path, check=False)
    assert_clean_error(result, '--data-dir', 'is not a folder')
    result = run_script('gpu_check.py', '--data-dir', tmp_path, '--out', tmp_path, '--only', 'bogus', cwd=tmp_path,
                        check=False)
    assert_clean_error(result, '--only bogus')
