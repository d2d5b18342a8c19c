"""Train with each recipe for several seeds and epoch counts, and print test accuracy as mean ± spread.

    python compare_recipes.py --data-dir DIR                       # tutorial vs fast: 3, 5, 30 epochs, seeds 0-2
    python compare_recipes.py --data-dir DIR --val-size 5000 --recipes fast --epochs 3 5   # tuning

Every run is a real `train_gpu_2.py` run in its own folder under --out (checkpoints and TensorBoard logs
kept for a look); a finished run is not repeated, so an interrupted comparison continues where it stopped.
With a constant learning rate (the tutorial recipe) the accuracy after k epochs does not depend on how
many epochs were planned, so one run of the longest length gives every row; a schedule needs one run per
length. Time is the training and evaluation time the run logged (start-up excluded).

It also draws test accuracy against epochs into --plot (a PNG; matplotlib needed, only here): for each recipe
the mean over the seeds of its longest runs' curves, their spread (min to max) shaded, and the final accuracy
of each shorter run of a scheduled recipe as a point with its spread.
"""
import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from training.cli import ArgumentParser, non_negative_int, positive_int, run
from training.errors import UserError
from training.paths import project_path
from training.recipe import RECIPES

HERE = Path(__file__).resolve().parent


def train(recipe: str, epochs: int, seed: int, args) -> Path:
    """One run (unless it already finished); returns its TensorBoard folder, as its last.pth names it."""
    folder = Path(args.out) / f'{recipe}-{epochs}ep-seed{seed}'
    last = folder / 'model' / 'last.pth'
    done = last.is_file() and torch.load(last, map_location='cpu', weights_only=True)['resume']['epoch'] == epochs
    if not done:
        resume = ['--resume'] if last.is_file() else []
        command = [sys.executable, str(HERE / 'train_gpu_2.py'), '--recipe', recipe, '--epochs', str(epochs),
                   '--seed', str(seed), '--data-dir', args.data_dir, '--device', args.device,
                   '--val-size', str(args.val_size), '--checkpoint-dir', str(folder / 'model'),
                   '--log-dir', str(folder / 'logs'), '--run-name', 'run', '--quiet', *resume]
        print(f'{recipe}, {epochs} epochs, seed {seed} ...', flush=True)
        if subprocess.run(command).returncode != 0:
            raise UserError(f'failed: {" ".join(command)}')
    return Path(torch.load(last, map_location='cpu', weights_only=True)['run_dir'])


def curve(run_dir: Path) -> tuple:
    """(test accuracy after each epoch, seconds up to the end of each epoch) from the run's log."""
    events = EventAccumulator(str(run_dir), size_guidance={'scalars': 0})
    events.Reload()
    accuracy = {e.step: e.value for e in events.Scalars('test_accuracy')}  # a resumed run: the last write wins
    seconds = {e.step: e.value for e in events.Scalars('epoch_seconds')}
    total, elapsed = 0.0, []
    for epoch in sorted(seconds):
        total += seconds[epoch]
        elapsed.append(total)
    return [accuracy[k] for k in sorted(accuracy)], elapsed


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', default=str(project_path('dataset')),
                   help="as for training (default: the project's dataset/)")
    p.add_argument('--recipes', nargs='+', choices=list(RECIPES), default=list(RECIPES))
    p.add_argument('--epochs', nargs='+', type=positive_int, default=[3, 5, 30])
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--val-size', type=non_negative_int, default=0,
                   help='evaluate on this many held-out training images instead of test/ (for tuning)')
    p.add_argument('--device', choices=['auto', 'cpu', 'cuda', 'mps'], default='auto')
    p.add_argument('--out', default='recipe-runs', help='where the runs go (default: recipe-runs)')
    p.add_argument('--plot', default=None,
                   help="the PNG of accuracy against epochs (default: OUT/recipes.png; 'none': no picture)")
    args = p.parse_args(argv)

    split = f'{args.val_size} held-out training images' if args.val_size else 'test split'
    rows = [f'| recipe | epochs | seeds | {split}: mean ± std | min – max | time per run |',
            '|---|---:|---|---:|---:|---:|']
    curves = {}  # recipe -> planned epochs -> one accuracy curve (fractions) per seed
    for recipe in args.recipes:
        constant = RECIPES[recipe]['schedule'] == 'constant'
        for epochs in sorted(args.epochs):
            results = []
            for seed in args.seeds:
                planned = max(args.epochs) if constant else epochs
                accuracy, elapsed = curve(train(recipe, planned, seed, args))
                curves.setdefault(recipe, {}).setdefault(planned, {})[seed] = accuracy
                results.append((accuracy[epochs - 1] * 100, elapsed[epochs - 1]))
            accuracies = [a for a, _ in results]
            spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
            rows.append(f'| {recipe} | {epochs} | {",".join(map(str, args.seeds))} | '
                        f'{statistics.mean(accuracies):.2f} % ± {spread:.2f} | '
                        f'{min(accuracies):.2f} – {max(accuracies):.2f} % | '
                        f'{statistics.mean(s for _, s in results):.0f} s |')
            print(rows[-1], flush=True)
    print('\n'.join(rows))
    if args.plot != 'none':
        path = Path(args.plot or Path(args.out) / 'recipes.png')
        try:
            draw(curves, path, split)
            print(f'accuracy against epochs: {path}')
        except ImportError:
            print('no picture drawn: it needs matplotlib (python -m pip install matplotlib)')


def draw(curves: dict, path: Path, split: str):
    """The picture: per recipe, the mean curve of its longest runs over the seeds with their min-max spread
    shaded, and each shorter run's final accuracy (mean, min-max bar). Returns the matplotlib Figure."""
    from matplotlib.figure import Figure  # (no pyplot: no window, no GUI toolkit, on any machine)
    figure = Figure(figsize=(7, 4.5), layout='constrained')
    axes = figure.subplots()
    for recipe, runs in curves.items():
        longest = max(runs)
        by_epoch = list(zip(*runs[longest].values()))  # per epoch, one accuracy per seed
        epochs = range(1, longest + 1)
        mean = [100 * statistics.mean(values) for values in by_epoch]
        line, = axes.plot(epochs, mean, label=f'{recipe} ({longest} epochs, mean of {len(runs[longest])} seeds)')
        axes.fill_between(epochs, [100 * min(v) for v in by_epoch], [100 * max(v) for v in by_epoch],
                          color=line.get_color(), alpha=0.2, linewidth=0)
        for planned in sorted(runs)[:-1]:  # a scheduled recipe's shorter runs: a point at their end
            final = [100 * accuracy[planned - 1] for accuracy in runs[planned].values()]
            centre = statistics.mean(final)
            axes.errorbar([planned], [centre], yerr=[[centre - min(final)], [max(final) - centre]], fmt='o',
                          color=line.get_color(), capsize=3)
            axes.annotate(f'{planned}-epoch run', (planned, centre), textcoords='offset points', xytext=(6, -12),
                          fontsize=8, color=line.get_color())
    axes.set_xlabel('epochs')
    axes.set_ylabel(f'accuracy on the {split} (%)')
    axes.set_title('MyModel on CIFAR-10: the tutorial\'s recipe and --recipe fast')
    axes.grid(alpha=0.3)
    axes.legend(loc='lower right')
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return figure


if __name__ == '__main__':
    run(main)
