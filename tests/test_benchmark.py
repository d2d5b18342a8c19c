"""benchmark.py runs end to end and reports both loops (its timings are reported, never asserted)."""
import json

from conftest import run_script


def test_benchmark_reports_both_loops_and_their_ratio(tmp_path):
    result = run_script('benchmark.py', '--steps', 3, '--warmup', 1, '--rounds', 1, '--device', 'cpu', cwd=tmp_path)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for loop in ('tutorial', 'project'):
        assert report[loop]['train_img_s'] > 0 and report[loop]['test_img_s'] > 0
    assert report['train_ratio'] == report['project']['train_img_s'] / report['tutorial']['train_img_s']
    assert 'ratio' in result.stdout and 'tutorial' in result.stdout
