"""benchmark.py runs end to end; its project figures are train_gpu_2.py's own measurements (its timings
are reported, never asserted)."""
import json

import pytest

from conftest import run_main, script_module


def test_benchmark_times_the_training_script_itself(tmp_path, monkeypatch):
    benchmark = script_module('benchmark.py')
    calls, real_main = [], benchmark.train_gpu_2.main

    def recorded(argv):
        progress = real_main(argv)
        calls.append((argv, progress.history[-1]))
        return progress

    monkeypatch.setattr(benchmark.train_gpu_2, 'main', recorded)
    result = run_main('benchmark.py', '--images', 320, '--warmup', 1, '--rounds', 1, '--device', 'cpu', cwd=tmp_path)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    (argv, epoch), = calls  # one round: train_gpu_2.main ran once, for two epochs, timed on the second
    assert argv[argv.index('--epochs') + 1] == '2' and epoch['epoch'] == 1
    assert report['project']['train_img_s'] == pytest.approx(epoch['train_images'] / epoch['train_seconds'])
    assert report['project']['test_img_s'] == pytest.approx(epoch['test_images'] / epoch['test_seconds'])
    assert report['tutorial']['train_img_s'] > 0 and report['tutorial']['test_img_s'] > 0
    assert 'ratio' in result.stdout and list(tmp_path.iterdir()) == []  # its runs' files went to a scratch folder
