"""Check every CUDA path of the project in one command on a GPU machine, and measure it.

    python gpu_check.py --out OUT                            # on a GPU: the real check, within --budget (8 min)
    python gpu_check.py --data-dir DIR --out OUT             # ... on a copy of CIFAR-10 (accuracies that mean something)
    python gpu_check.py --out OUT --tiny                     # minutes-free rehearsal (the default without CUDA)
    python gpu_check.py --data-dir DIR --out OUT --only runs,ddp   # some steps again

DIR: CIFAR-10 or image folders (train/<class>/, test/<class>/); without it, CIFAR-10-format images are
generated into OUT/data as benchmark.py does (their class is their colour: the speeds are real, the accuracies
are not CIFAR-10's, and the table says so). The steps, each in its own processes (and process group, killed
whole when it overruns), each bounded by its time limit and by what is left of --budget; a step that fails is
recorded and the next one runs; each step's result is printed as soon as it is known:

  tests      the test suite, CUDA-only tests included (with CUDA), and its summary line
  benchmark  benchmark.py on the device at batch 64 and at the fast recipe's batch, with and without
             --compile: images/s, the ratio to the tutorial's loop, the fraction of the card's bf16 peak
  runs       a whole default train_gpu_2.py run (30 epochs), a 1-epoch train_gpu_1.py run (it must say
             "training device: cuda"), a 5-epoch --recipe fast run: time and test accuracy; then test.py
             classifies images/ on the CPU with each run's best.pth
  ddp        train_ddp.py under torchrun with one process, against train_gpu_2.py at the same settings
             (the cost of the DistributedDataParallel wrapper): the median images/s of each; the baseline
             is the runs step's default run when this invocation made it, else a run of its own

Results go to OUT/gpu_check.json and OUT/gpu_check.txt (one table: card, driver, torch, date), rewritten after
every step so that a run cut short still leaves what it measured; each step's output is in OUT/logs/.
--tiny shrinks every step (few epochs, small benchmark, no --compile, a named part of the test suite) so
that the same code runs on a CPU in a minute: the test suite runs it that way, so it cannot rot.
"""
import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmark import TRAIN_FLOPS, cpu_name
from training.cli import ArgumentParser, positive_int, run
from training.datagen import write_cifar10
from training.errors import UserError

ROOT = Path(__file__).resolve().parent
STEPS = ('tests', 'benchmark', 'runs', 'ddp')
TINY_TESTS = 'tests/test_model.py'

# dense bf16 tensor-core peak, TFLOP/s, from NVIDIA's data sheets (None: no bf16 tensor cores)
BF16_PEAK = [('H100 PCIe', 756), ('H100 NVL', 835), ('H100', 989), ('H200', 989), ('GH200', 989), ('B200', 2250),
             ('A100', 312), ('A10G', 70), ('A10', 125), ('L40S', 362), ('L40', 181), ('L4', 121),
             ('RTX 4090', 165), ('RTX 3090', 71), ('T4', None), ('V100', None)]


def bf16_peak(name: str):
    return next((peak for key, peak in BF16_PEAK if key in name), None)


class Check:
    """Runs the steps' commands, keeps their logs, and collects what they measured."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out).resolve()  # the commands run from the repository
        self.logs = self.out / 'logs'
        self.logs.mkdir(parents=True, exist_ok=True)
        self.cuda = args.device == 'cuda'
        self.default_run = None  # the runs step's default train_gpu_2.py run: the ddp step's baseline too
        self.deadline = time.monotonic() + args.budget
        self.results = {'machine': machine(self.cuda), 'tiny': args.tiny, 'data_dir': str(args.data_dir),
                        'generated_data': args.generated, 'budget': args.budget,
                        'command': ' '.join(['python', *sys.argv]), 'steps': {}}

    def command(self, name: str, argv: list, timeout: float, env: dict = None) -> tuple:
        """Run ``argv`` from the repository (its output into logs/NAME.log), for at most ``timeout`` seconds and
        what is left of the budget: (exit code, or 'timeout', output, seconds). An overrun kills the command's
        whole process group: torchrun's workers too, which would keep the GPU."""
        timeout = max(1.0, min(timeout, self.deadline - time.monotonic()))
        start = time.perf_counter()
        environment = {**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})}
        process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=environment, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=timeout)
            code = process.returncode
        except subprocess.TimeoutExpired:
            kill_group(process)
            output, _ = process.communicate()
            code, output = 'timeout', f'{output}\n(stopped after {timeout:.0f}s: the time limit)'
        seconds = time.perf_counter() - start
        log = f'$ {" ".join(map(str, argv))}\n{output}\nexit: {code}, {seconds:.1f}s\n'
        (self.logs / f'{name}.log').write_text(log)
        return code, output, seconds

    def out_of_time(self) -> bool:
        return self.deadline - time.monotonic() < 5

    def record(self, step: str, result: dict) -> None:
        self.results['steps'][step] = result
        (self.out / 'gpu_check.json').write_text(json.dumps(self.results, indent=2))
        (self.out / 'gpu_check.txt').write_text(table(self.results))

    # ------------------------------------------------------------------ the steps

    def tests(self) -> dict:
        selection = self.args.pytest.split() if self.args.pytest else []
        code, output, seconds = self.command('tests', [sys.executable, '-m', 'pytest', '-q', '-rs', '-p',
                                                       'no:cacheprovider', *selection], timeout=self.limit(300),
                                             env={'GPU_CHECK_RUNNING': '1'})  # its own test is skipped there
        summary = next((line.strip('= ') for line in reversed(output.splitlines())
                        if re.search(r'\d+ (passed|failed|error)', line)),
                       f'stopped at its time limit after {seconds:.0f}s' if code == 'timeout' else 'no summary')
        return {'ok': code == 0, 'summary': summary, 'seconds': round(seconds, 1),
                'cuda_skips': output.count('needs an NVIDIA GPU')}

    def benchmark(self) -> dict:
        rows, tiny = [], self.args.tiny
        size = ['--images', '640', '--rounds', '1', '--warmup', '2'] if tiny else ['--rounds', '1']
        peak = bf16_peak(self.results['machine']['device_name']) if self.cuda else None
        for batch in (64, 128):
            for compiled in ((False,) if tiny or batch == 64 else (False, True)):  # (compiling takes time: once)
                name = f'benchmark-{batch}{"-compile" if compiled else ""}'
                code, output, seconds = self.command(name, [
                    sys.executable, 'benchmark.py', '--device', self.args.device, '--batch-size', str(batch), *size,
                    *(['--compile'] if compiled else [])], timeout=self.limit(180))
                figures = last_json(output)
                row = {'batch': batch, 'compile': compiled, 'ok': code == 0 and figures is not None,
                       'seconds': round(seconds, 1)}
                if figures:
                    tflops = figures['project']['train_img_s'] * TRAIN_FLOPS / 1e12
                    row.update(train_img_s=round(figures['project']['train_img_s']),
                               tutorial_img_s=round(figures['tutorial']['train_img_s']),
                               train_ratio=round(figures['train_ratio'], 2), test_ratio=round(figures['test_ratio'], 2),
                               precision=figures['precision'], train_tflops=round(tflops, 3),
                               bf16_peak_fraction=None if peak is None else tflops / peak)
                rows.append(row)
        return {'ok': all(r['ok'] for r in rows), 'rows': rows}

    def train(self, name: str, script: str, *flags, launcher=None) -> dict:
        folder = self.out / 'runs' / name
        shutil.rmtree(folder, ignore_errors=True)
        argv = [*(launcher or [sys.executable]), script, '--data-dir', str(self.args.data_dir), '--checkpoint-dir',
                str(folder / 'model'), '--log-dir', str(folder / 'logs'), '--run-name', 'run', *flags]
        code, output, seconds = self.command(name, argv, timeout=self.limit(300))
        device = re.search(r'training device: (\S+)', output)
        result = {'ok': code == 0, 'seconds': round(seconds, 1), 'device': device and device[1]}
        last = folder / 'model' / 'last.pth'
        if last.is_file():
            state = torch.load(last, map_location='cpu', weights_only=True)
            result.update(epochs=state['resume']['epoch'], test_accuracy=state['test_accuracy'],
                          best_accuracy=state['best']['accuracy'])
            speeds = scalar(folder / 'logs' / 'run', 'images_per_second')
            result['images_per_second'] = round(sorted(speeds)[len(speeds) // 2]) if speeds else None
        return result

    def classify(self, run: str) -> dict:
        """test.py on images/ with the run's best.pth, on the CPU."""
        best = self.out / 'runs' / run / 'model' / 'best.pth'
        code, output, _ = self.command(f'test-{run}', [sys.executable, 'test.py', 'images', '--checkpoint', str(best),
                                                       '--device', 'cpu', '--json'], timeout=120)
        predictions = (last_json(output) or {}).get('predictions', [])
        pictures = sorted(p.name for p in (ROOT / 'images').iterdir() if p.suffix in ('.png', '.jpg'))
        named = sorted(Path(p['image']).name for p in predictions)
        return {'ok': code == 0 and named == pictures,
                'answers': {Path(p['image']).name: p['top'][0]['class'] for p in predictions}}

    def runs(self) -> dict:
        tiny = self.args.tiny
        epochs = (lambda n: ['--epochs', str(min(n, 2))]) if tiny else (lambda n: ['--epochs', str(n)])
        device = [] if self.cuda else ['--device', 'cpu']
        results = {'train_gpu_2 default': self.train('gpu2-default', 'train_gpu_2.py', *epochs(30), *device),
                   'train_gpu_1 1 epoch': self.train('gpu1-1-epoch', 'train_gpu_1.py', *epochs(1)),
                   'train_gpu_2 fast 5 epochs': self.train('gpu2-fast', 'train_gpu_2.py', '--recipe', 'fast',
                                                           *epochs(5), *device)}
        self.default_run = dict(results['train_gpu_2 default'])  # (before test.py's answers join it)
        expected = 'cuda' if torch.cuda.is_available() else 'cpu'  # train_gpu_1.py uses a GPU whenever there is one
        results['train_gpu_1 1 epoch']['ok'] &= results['train_gpu_1 1 epoch']['device'] == expected
        for name, run_folder in (('train_gpu_2 default', 'gpu2-default'), ('train_gpu_2 fast 5 epochs', 'gpu2-fast')):
            results[name]['classify_on_cpu'] = self.classify(run_folder)
            results[name]['ok'] &= results[name]['classify_on_cpu']['ok']
        return {'ok': all(r['ok'] for r in results.values()), 'runs': results}

    def ddp(self) -> dict:
        if not (ROOT / 'train_ddp.py').is_file():
            return {'ok': True, 'skipped': 'no train_ddp.py'}
        epochs = ['--epochs', '2' if self.args.tiny else '5']
        device = ['--device', self.args.device]
        torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node=1']
        baseline = self.default_run if self.default_run and self.default_run['ok'] else \
            self.train('ddp-baseline', 'train_gpu_2.py', *epochs, *device)
        results = {'train_gpu_2': baseline,
                   'train_ddp, 1 process': self.train('ddp-1', 'train_ddp.py', *epochs, *device, launcher=torchrun)}
        one, wrapped = (results[k].get('images_per_second') for k in results)
        return {'ok': all(r['ok'] for r in results.values()), 'runs': results,
                'ddp_speed_ratio': round(wrapped / one, 3) if one and wrapped else None}

    def limit(self, seconds: float) -> float:
        return seconds * (0.5 if self.args.tiny else 1)


def kill_group(process: subprocess.Popen) -> None:
    """Kill ``process`` and every process it started (they share its session's process group)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (AttributeError, ProcessLookupError, PermissionError):  # (Windows has no process groups)
        process.kill()


def machine(cuda: bool) -> dict:
    info = {'date': datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), 'torch': torch.__version__,
            'python': platform.python_version(), 'cpu': cpu_name(), 'device_name': 'cpu', 'driver': None,
            'cuda': torch.version.cuda}
    if cuda:
        info['device_name'] = torch.cuda.get_device_name(0)
        try:
            info['driver'] = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                                            capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            info['driver'] = 'unknown (no nvidia-smi)'
    return info


def last_json(output: str):
    """The last line of ``output`` that is a JSON object (benchmark.py's and test.py --json's results)."""
    for line in reversed(output.splitlines()):
        if line.startswith('{'):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def scalar(run_dir: Path, tag: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    if not run_dir.is_dir():
        return []
    events = EventAccumulator(str(run_dir), size_guidance={'scalars': 0})
    events.Reload()
    return [e.value for e in events.Scalars(tag)] if tag in events.Tags()['scalars'] else []


def table(results: dict) -> str:
    m = results['machine']
    data = ('generated CIFAR-10-format images (their class is their colour: the accuracies below are not '
            'CIFAR-10\'s)' if results.get('generated_data') else results['data_dir'])
    lines = [f'gpu_check.py — {m["date"]} — {m["device_name"]} (driver {m["driver"]}, CUDA {m["cuda"]}), '
             f'torch {m["torch"]}, Python {m["python"]}, CPU {m["cpu"]}{" — TINY settings" if results["tiny"] else ""}',
             f'command: {results["command"]}', f'data: {data}', '']
    lines += step_lines(results)
    failed = [s for s, r in results['steps'].items() if not r['ok']]
    lines.append(f'result: {"all steps OK" if not failed else "FAILED: " + ", ".join(failed)}')
    return '\n'.join(lines) + '\n'


def step_lines(results: dict, only: str = None) -> list:
    """The table's lines for each step (or for the step ``only``): a failed or stopped one says so, and why."""
    lines = []
    steps = {k: v for k, v in results['steps'].items() if only in (None, k)}
    for step, r in steps.items():
        if r.get('error') or r.get('skipped_for_time'):
            why = r.get('error') or 'not run: the --budget was used up'
            lines += [f'{step}: {"FAILED" if r.get("error") else "skipped"} — {why}', '']
    steps = {k: v for k, v in steps.items() if not (v.get('error') or v.get('skipped_for_time'))}
    if 'tests' in steps:
        t = steps['tests']
        lines += [f'tests: {"OK" if t["ok"] else "FAILED"} — {t["summary"]} ({t["seconds"]}s; '
                  f'{t["cuda_skips"]} skipped for want of a GPU)', '']
    if 'benchmark' in steps:
        lines.append('benchmark.py     batch  compile  precision  train img/s  tutorial img/s  ratio (train/test)  '
                     'TFLOP/s  of bf16 peak')
        for r in steps['benchmark']['rows']:
            if 'train_img_s' not in r:
                lines.append(f'{"":16} {r["batch"]:5}  {"yes" if r["compile"] else "no":7}  FAILED (see logs/)')
                continue
            peak = 'n/a' if r['bf16_peak_fraction'] is None else f'{r["bf16_peak_fraction"]:.2%}'
            lines.append(f'{"":16} {r["batch"]:5}  {"yes" if r["compile"] else "no":7}  {r["precision"]:9}  '
                         f'{r["train_img_s"]:11}  {r["tutorial_img_s"]:14}  {r["train_ratio"]:7.2f}x / '
                         f'{r["test_ratio"]:.2f}x  {r["train_tflops"]:8.3f}  {peak:>12}')
        lines.append('')
    for step in ('runs', 'ddp'):
        if step not in steps:
            continue
        if steps[step].get('skipped'):
            lines += [f'{step}: skipped ({steps[step]["skipped"]})', '']
            continue
        lines.append(f'{step:16} {"ok":4} {"device":7} {"epochs":>6} {"time":>8} {"img/s":>8} {"test acc":>9} '
                     f'{"best":>7}  test.py on the CPU')
        for name, r in steps[step]['runs'].items():
            answers = r.get('classify_on_cpu', {}).get('answers')
            lines.append(f'  {name:26} {"ok" if r["ok"] else "FAIL":4} {r.get("device") or "?":7} '
                         f'{r.get("epochs", "?"):>6} {r["seconds"]:7.1f}s {r.get("images_per_second") or 0:8} '
                         f'{fmt(r.get("test_accuracy")):>9} {fmt(r.get("best_accuracy")):>7}  '
                         f'{", ".join(f"{k}: {v}" for k, v in answers.items()) if answers else ""}')
        if step == 'ddp' and steps[step].get('ddp_speed_ratio'):
            lines.append(f'  1-process DDP / train_gpu_2.py images/s: {steps[step]["ddp_speed_ratio"]:.2f}x')
        lines.append('')
    return lines


def fmt(accuracy) -> str:
    return '?' if accuracy is None else f'{accuracy:.2%}'


def main(argv=None) -> int:
    p = ArgumentParser(prog='gpu_check.py', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', help='CIFAR-10 or image folders for the training runs (default: generated '
                                      'CIFAR-10-format images, in OUT/data)')
    p.add_argument('--out', required=True, help='folder for gpu_check.json, gpu_check.txt and logs/')
    p.add_argument('--device', choices=['auto', 'cuda', 'cpu'], default='auto',
                   help='auto: cuda when there is a GPU, else the cpu with --tiny')
    p.add_argument('--tiny', action='store_true', help='small settings everywhere (always on the cpu)')
    p.add_argument('--budget', type=positive_int, default=480,
                   help='seconds for the whole check: each step gets at most what is left (default: 480)')
    p.add_argument('--only', default=','.join(STEPS),
                   help=f'comma-separated steps to run (default: all: {",".join(STEPS)})')
    p.add_argument('--pytest', default=None,
                   help=f'what the tests step passes to pytest (default: the whole suite; with --tiny: {TINY_TESTS})')
    args = p.parse_args(argv)
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise UserError(f'--data-dir {args.data_dir} is not a folder: give a copy of CIFAR-10 or image folders, or '
                        f'leave --data-dir out for generated data')
    if args.device == 'auto':
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda: CUDA is not available here; leave --device out to rehearse on the cpu')
    args.tiny = args.tiny or args.device == 'cpu'
    if args.pytest is None:
        args.pytest = TINY_TESTS if args.tiny else ''
    steps = [s.strip() for s in args.only.split(',') if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise UserError(f'--only {",".join(unknown)}: the steps are {", ".join(STEPS)}')
    args.generated = args.data_dir is None
    args.data_dir = Path(args.data_dir).resolve() if args.data_dir else generated_data(Path(args.out), args.tiny)
    check = Check(args)
    previous = Path(args.out) / 'gpu_check.json'
    if previous.is_file() and set(steps) != set(STEPS):  # --only: keep the other steps' earlier results
        check.results['steps'] = json.loads(previous.read_text()).get('steps', {})
    for step in steps:
        print(f'{step} ...', flush=True)
        check.record(step, run_step(check, step))
        print('\n'.join(step_lines(check.results, step)), flush=True)  # as soon as it is known
    text = table(check.results)
    print(text, end='')
    return 0 if all(r['ok'] for r in check.results['steps'].values()) else 1


def run_step(check: Check, step: str) -> dict:
    """One step's results; a step that fails in the check itself (not in what it runs) is a FAILED row too."""
    if check.out_of_time():
        return {'ok': False, 'skipped_for_time': True}
    try:
        return getattr(check, step)()
    except Exception as e:  # the table must still come out, with the other steps' rows
        return {'ok': False, 'error': f'{type(e).__name__}: {e}'}


def generated_data(out: Path, tiny: bool) -> Path:
    """CIFAR-10-format images in OUT/data (made once): 45,000 / 5,000, as many as the development copy has."""
    folder = out / 'data'
    if not (folder / 'cifar-10-batches-py' / 'batches.meta').is_file():
        shutil.rmtree(folder, ignore_errors=True)
        print('generating CIFAR-10-format images (no --data-dir) ...', flush=True)
        write_cifar10(folder, per_batch=200 if tiny else 9000, test=200 if tiny else 5000)
    return folder.resolve()


if __name__ == '__main__':
    run(lambda: sys.exit(main()))
