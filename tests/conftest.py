"""Shared helpers: small generated data sets in the real on-disk formats, and the project's scripts run
either in this process (their real ``main(argv)`` behind the command line's error handler: fast) or as
subprocesses (where signals, exit codes or a fresh interpreter are the point).

Nothing here touches the network: every subprocess runs with a proxy that points at a closed local port.
"""
import collections
import contextlib
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import training.paths
from training.cli import run
from training.datagen import CLASSES, write_cifar10, write_image_folders  # noqa: F401  (for the test modules)

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = {'http_proxy': 'http://127.0.0.1:9', 'https_proxy': 'http://127.0.0.1:9',
           'HTTP_PROXY': 'http://127.0.0.1:9', 'HTTPS_PROXY': 'http://127.0.0.1:9', 'no_proxy': ''}
SCRIPTS = ['train.py', 'train_gpu_1.py', 'train_gpu_2.py']
# for the tests that send signals between processes, kill -9, or need fork, resource or fcntl: Windows has none
posix_only = pytest.mark.skipif(os.name == 'nt', reason='needs POSIX signals and processes (not on Windows)')
TRAIN_FLAGS = ('--epochs', 2, '--batch-size', 16, '--lr', 0.02, '--log-interval', 5,  # 63 steps an epoch
               '--precision', 'fp32')  # bit-for-bit comparisons are made in fp32
CPU = ('--device', 'cpu') if torch.cuda.is_available() else ()  # for train_gpu_2.py where a test needs the CPU


def load_script(name: str):
    """A top-level script as a module (test.py cannot be imported by name: Python has a `test` package)."""
    spec = importlib.util.spec_from_file_location(Path(name).stem, ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT_MODULES = {}


def script_module(name: str):
    if name not in SCRIPT_MODULES:
        SCRIPT_MODULES[name] = load_script(name)
    return SCRIPT_MODULES[name]


@contextlib.contextmanager
def working_directory(path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def project_at(folder):
    """The project's own folders (dataset/, model/, logs/, images/) taken to be in ``folder``, as they are for
    a copy of the project there (see project_copy)."""
    previous = training.paths.PROJECT_DIR
    training.paths.PROJECT_DIR = Path(folder).resolve()
    try:
        yield
    finally:
        training.paths.PROJECT_DIR = previous


# what a learner's project folder holds (the tests and developer tools stay behind)
PROJECT_FILES = ['model.py', *SCRIPTS, 'train_ddp.py', 'test.py', 'training', 'images']


def project_copy(folder: Path) -> Path:
    """The project's code copied into ``folder`` (once), so that a script run from there has its own default
    folders there, as a learner's copy of the project does. Returns ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if folder.resolve() != ROOT and not (folder / 'training').is_dir():
        for name in PROJECT_FILES:
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns('__pycache__'))
            else:
                shutil.copy2(ROOT / name, folder / name)
    return folder


class NoNewPython(subprocess.Popen):
    """subprocess.Popen while mutmut runs the suite: a test that starts another Python is skipped, since
    mutmut cannot see which functions the new process runs (see [tool.mutmut] in pyproject.toml)."""

    def __init__(self, args, *rest, **options):
        if not isinstance(args, (str, bytes)) and args and str(args[0]) == sys.executable:
            pytest.skip('starts a new Python process, out of the mutation run\'s sight')
        super().__init__(args, *rest, **options)


def pytest_sessionstart(session):
    # MUTANT_UNDER_TEST: set by mutmut in every process it runs tests in; MUTANT_IN_SUBPROCESSES=1: run the tests
    # that start scripts anyway, to check one mutant by hand (they inherit it: see the README's developer part)
    if 'MUTANT_UNDER_TEST' in os.environ and not os.environ.get('MUTANT_IN_SUBPROCESSES'):
        subprocess.Popen = NoNewPython
    if 'MUTANT_UNDER_TEST' in os.environ:
        torch.set_num_threads(1)  # mutmut tests one mutant per core: two threads each would fight over them


# fixtures that train (or write 10,000 images) the first time a test asks for them; each test file's own are
# session-scoped too, so that a test run in another order than the files' makes each of them once
SHARED_RUNS = {'runs', 'trained', 'slow_data', 'reference', 'fast_run', 'fp32_run'}
KILLERS = Path('mutmut-killers.txt')  # under mutmut: the tests that failed, by mutated function (a log of ours)


def mutant_function(name: str) -> str:
    return name.rsplit('__mutmut_', 1)[0]


def mutant_under_test():
    """The mutant mutmut runs the tests against, or None (a normal run, mutmut's stats and clean runs)."""
    name = os.environ.get('MUTANT_UNDER_TEST')
    return name if name and '__mutmut_' in name else None


def pytest_collection_modifyitems(session, config, items):
    """Under mutmut, the tests likeliest to fail first: a mutant's run stops at its first failing test (-x), and
    only a mutant that survives pays for every test. First come the tests that failed for another mutant of the
    same function, then the rest, quickest first, by the times mutmut measured (mutmut-stats.json, in the folder
    it runs the tests from)."""
    mutant, stats = mutant_under_test(), Path('mutmut-stats.json')
    if mutant is None or not stats.is_file():
        return
    seconds = json.loads(stats.read_text(encoding='utf-8'))['duration_by_test']
    failed = collections.Counter()
    if KILLERS.is_file():
        for line in KILLERS.read_text(encoding='utf-8').splitlines():
            function, _, test = line.partition('\t')
            failed[test] += function == mutant_function(mutant)
    items.sort(key=lambda item: (-failed[item.nodeid], seconds.get(item.nodeid, 1.0)
                                 + 2.0 * bool(SHARED_RUNS & set(item.fixturenames))))


def pytest_runtest_logreport(report):
    mutant = mutant_under_test()
    if mutant is not None and report.failed:
        with KILLERS.open('a', encoding='utf-8') as log:  # one short line: the two workers' lines never mix
            log.write(f'{mutant_function(mutant)}\t{report.nodeid}\n')


def pytest_sessionfinish(session):
    if subprocess.Popen is NoNewPython:  # (mutmut runs several sessions in one process)
        subprocess.Popen = NoNewPython.__base__
    # under mutmut, each of thousands of sessions leaves a folder of generated data sets and runs, and pytest's own
    # clean-up of old ones does not keep up with mutmut's workers: 70 GB after about 3,000 mutants
    basetemp = session.config._tmp_path_factory._basetemp
    if mutant_under_test() and basetemp is not None:
        shutil.rmtree(basetemp, ignore_errors=True)


def run_main(script: str, *args, cwd: Path, check: bool = True, project: Path = None):
    """``script``'s main(args) in this process, from ``cwd``, through the same error handler as the command
    line; returns a CompletedProcess (exit code, stdout, stderr), like run_script. The project's own folders
    are taken to be in ``project`` (default: ``cwd``)."""
    out, err = io.StringIO(), io.StringIO()
    argv = [str(a) for a in args]
    with working_directory(cwd), project_at(project or cwd), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            run(lambda: script_module(script).main(argv))
            code = 0
        except SystemExit as e:
            code = e.code
    result = subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f'{script} {" ".join(argv)} exited {code}\n--- stdout\n{result.stdout}\n'
                             f'--- stderr\n{result.stderr}')
    return result


def script_env(**changes) -> dict:
    """The environment a script runs in here: offline, unbuffered output; ``NAME=None`` removes NAME."""
    env = {**os.environ, **OFFLINE, 'PYTHONUNBUFFERED': '1', **changes}
    return {name: value for name, value in env.items() if value is not None}


def script_path(script: str, cwd: Path) -> Path:
    """Where a subprocess runs ``script`` from: a copy of the project in ``cwd`` for the learner's scripts (so
    that their default folders are there), the repository for the developer tools."""
    return (project_copy(cwd) if script in PROJECT_FILES else ROOT) / script


def run_script(script: str, *args, cwd: Path, check: bool = True, timeout: float = 300, env=None, text=True):
    """Run one of the project's scripts as a user would, in a new process, from ``cwd`` (see script_path).
    ``text=False``: its output as bytes, as the console gets them (to decode in the console's encoding)."""
    result = subprocess.run([sys.executable, str(script_path(script, cwd)), *map(str, args)], cwd=cwd,
                            env=script_env(**(env or {})), capture_output=True, text=text, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f'{script} {" ".join(map(str, args))} exited {result.returncode}\n'
                             f'--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}')
    return result


def start_script(script: str, *args, cwd: Path, **popen):
    """A script started in a new process, its output readable line by line as it comes."""
    return subprocess.Popen([sys.executable, str(script_path(script, cwd)), *map(str, args)], cwd=cwd,
                            env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


class Interrupter:
    """Sends this process a signal right after chosen training steps of in-process runs (counted from the
    start of each run), as Ctrl+C or `kill` would, at exactly that step: the real handler, no timing."""

    def __init__(self, monkeypatch):
        from training.meters import TrainMeter
        self.at, self.signum, self.steps = [], signal.SIGINT, 0
        add = TrainMeter.add

        def add_then_signal(meter, *args):
            add(meter, *args)
            self.steps += 1
            for _ in range(self.at.count(self.steps)):  # a step listed twice: two signals in a row
                signal.raise_signal(self.signum)  # (as a signal from outside arrives, on every platform)
        monkeypatch.setattr(TrainMeter, 'add', add_then_signal)

    def run(self, script, *args, cwd, at=(), signum=signal.SIGINT, check=False, project=None):
        """One in-process run, signalled after the steps in ``at`` (of this run)."""
        self.at, self.signum, self.steps = list(at), signum, 0
        return run_main(script, *args, cwd=cwd, check=check, project=project)


@pytest.fixture
def interrupter(monkeypatch):
    return Interrupter(monkeypatch)


def assert_clean_error(result, *fragments, code: int = 2):
    """A user error: exit code 2, one line on stderr that names the problem, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert 'Traceback' not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), (fragment, lines[0])
    return lines[0]


def fails_cleanly(script: str, argv, tmp_path: Path, *fragments):
    """main(argv) in this process fails with exit code 2 and one clear line on stderr."""
    return assert_clean_error(run_main(script, *argv, cwd=tmp_path, check=False), *fragments)


def same_length(*sequences):
    """zip(), after checking that the sequences have one length (zip(strict=True) needs Python 3.10)."""
    sequences = [list(s) for s in sequences]
    assert len({len(s) for s in sequences}) == 1, [len(s) for s in sequences]
    return zip(*sequences)


def load_weights(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)


def same_weights(a: Path, b: Path) -> bool:
    """Two checkpoints hold equal tensors, bit for bit (a bundle's 'model' is compared)."""
    a, b = load_weights(a), load_weights(b)
    a, b = (x['model'] if 'format' in x else x for x in (a, b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def scalars(run_dir: Path, tag: str) -> list:
    """(step, value) of one tag, from the run's real TensorBoard event files."""
    events = EventAccumulator(str(run_dir), size_guidance={'scalars': 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.fixture(scope='session')
def cifar_dir(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp('cifar'))


class Runs(dict):
    """{script: (folder, CompletedProcess)}: one real 2-epoch run of a training script on the generated CIFAR-10
    batches, same seed, in a folder of its own, made the first time a test asks for that script."""

    def __init__(self, cifar_dir: Path, tmp_path_factory):
        super().__init__()
        self.cifar_dir, self.tmp_path_factory = cifar_dir, tmp_path_factory

    def __missing__(self, script: str):
        work = self.tmp_path_factory.mktemp(script.replace('.py', ''))
        device = CPU if script == 'train_gpu_2.py' else ()
        self[script] = work, run_main(script, *TRAIN_FLAGS, '--data-dir', self.cifar_dir, *device,
                                      '--run-name', 'run', cwd=work)
        return self[script]


@pytest.fixture(scope='session')
def runs(cifar_dir, tmp_path_factory) -> Runs:
    """The training scripts' runs, shared by the tests that only read them (see Runs)."""
    return Runs(cifar_dir, tmp_path_factory)


@pytest.fixture(scope='session')
def trained(runs):
    """The train.py run: (folder, CompletedProcess)."""
    return runs['train.py']


@pytest.fixture(scope='session')
def slow_data(tmp_path_factory):
    """10,000 images: a few seconds an epoch, long enough to interrupt a run in the middle."""
    return write_cifar10(tmp_path_factory.mktemp('slow'), per_batch=1800, test=200)
