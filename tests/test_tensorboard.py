"""What a training run writes to TensorBoard, read back through a real TensorBoard server's HTTP API."""
import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

pytest.importorskip('tensorboard')

PER_EPOCH_SCALARS = ['test_loss', 'test_accuracy', 'train_accuracy', 'train_loss_epoch', 'epoch_seconds',
                     'images_per_second', 'test_accuracy_per_class/cat']


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def server(runs):
    """A real `tensorboard` over the logs of the 2-epoch train.py run, stopped afterwards."""
    logdir = runs['train.py'][0] / 'logs'
    port = free_port()
    process = subprocess.Popen([sys.executable, '-m', 'tensorboard.main', '--logdir', str(logdir), '--host',
                                '127.0.0.1', '--port', str(port), '--load_fast', 'false'],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    local = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy

    def get(path, **query):
        url = f'http://127.0.0.1:{port}{path}' + (f'?{urllib.parse.urlencode(query)}' if query else '')
        with local.open(url, timeout=10) as response:
            return json.loads(response.read())

    try:
        deadline = time.monotonic() + 90
        while True:  # bounded wait: until the server answers and has read the run's scalars
            try:
                if 'test_accuracy' in get('/data/plugin/scalars/tags').get('run', {}):
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError('tensorboard did not come up within 90 s')
            time.sleep(0.5)
        yield get
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def test_runs_are_listed(server):
    assert server('/data/runs') == ['run']


def test_scalars_have_the_right_steps_and_values(server):
    tags = server('/data/plugin/scalars/tags')['run']
    for tag in PER_EPOCH_SCALARS + ['train_loss', 'learning_rate']:
        assert tag in tags, tag
    for tag in PER_EPOCH_SCALARS:
        assert [step for _, step, _ in server('/data/plugin/scalars/scalars', run='run', tag=tag)] == [0, 1], tag
    accuracy = [value for _, _, value in server('/data/plugin/scalars/scalars', run='run', tag='test_accuracy')]
    assert all(0 <= v <= 1 for v in accuracy) and accuracy[-1] > 0.6
    loss = server('/data/plugin/scalars/scalars', run='run', tag='train_loss')
    assert [step for _, step, _ in loss] == list(range(5, 127, 5)) and loss[-1][2] < loss[0][2]
    lr = server('/data/plugin/scalars/scalars', run='run', tag='learning_rate')  # logged with train_loss
    assert [step for _, step, _ in lr] == list(range(5, 127, 5)) and [v for _, _, v in lr] == pytest.approx([0.02] * 25)


def test_images_confusion_matrix_and_samples(server):
    tags = server('/data/plugin/images/tags')['run']
    assert {'confusion_matrix', 'train_samples'} <= set(tags)
    assert [e['step'] for e in server('/data/plugin/images/images', run='run', tag='confusion_matrix')] == [0, 1]
    assert [e['step'] for e in server('/data/plugin/images/images', run='run', tag='train_samples')] == [0]


def test_weight_and_gradient_histograms(server):
    tags = server('/data/plugin/histograms/tags')['run']
    assert {'weights/model.0.weight', 'gradients/model.0.weight', 'weights/model.8.bias'} <= set(tags)
    histograms = server('/data/plugin/histograms/histograms', run='run', tag='weights/model.0.weight')
    assert [step for _, step, _ in histograms] == [0, 1]
    assert sum(count for _, _, count in histograms[0][2]) == pytest.approx(32 * 3 * 5 * 5)


def test_pr_curves_graph_and_hparams(server):
    pr_tags = server('/data/plugin/pr_curves/tags')['run']
    assert {f'pr_curve/{name}' for name in ('airplane', 'cat', 'truck')} <= set(pr_tags)
    assert server('/data/plugin/graphs/info')['run']['run_graph']
    scalars = server('/data/plugin/scalars/tags')
    hparams_run = next(run for run, tags in scalars.items() if 'hparam/best_test_accuracy' in tags)
    best = server('/data/plugin/scalars/scalars', run=hparams_run, tag='hparam/best_test_accuracy')
    final = server('/data/plugin/scalars/scalars', run='run', tag='test_accuracy')
    assert best[0][2] == pytest.approx(max(v for _, _, v in final))
