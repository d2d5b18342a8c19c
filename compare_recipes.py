"""Train with each recipe for several seeds and epoch counts, and print test accuracy as mean ± spread.

    python compare_recipes.py --data-dir DIR                       # tutorial vs fast: 3, 5, 30 epochs, seeds 0-2
    python compare_recipes.py --data-dir DIR --val-size 5000 --recipes fast --epochs 3 5   # tuning

Every run is a real `train_gpu_2.py` run in its own folder under --out (checkpoints and TensorBoard logs
kept for a look); a finished run is not repeated, so an interrupted comparison continues where it stopped.
With a constant learning rate (the tutorial recipe) the accuracy after k epochs does not depend on how
many epochs were planned, so one run of the longest length gives every row; a schedule needs one run per
length. Time is the training and evaluation time the run logged (start-up excluded).
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
    args = p.parse_args(argv)

    split = f'{args.val_size} held-out training images' if args.val_size else 'test split'
    rows = [f'| recipe | epochs | seeds | {split}: mean ± std | min – max | time per run |',
            '|---|---:|---|---:|---:|---:|']
    for recipe in args.recipes:
        constant = RECIPES[recipe]['schedule'] == 'constant'
        for epochs in sorted(args.epochs):
            results = []
            for seed in args.seeds:
                accuracy, elapsed = curve(train(recipe, max(args.epochs) if constant else epochs, seed, args))
                results.append((accuracy[epochs - 1] * 100, elapsed[epochs - 1]))
            accuracies = [a for a, _ in results]
            spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
            rows.append(f'| {recipe} | {epochs} | {",".join(map(str, args.seeds))} | '
                        f'{statistics.mean(accuracies):.2f} % ± {spread:.2f} | '
                        f'{min(accuracies):.2f} – {max(accuracies):.2f} % | '
                        f'{statistics.mean(s for _, s in results):.0f} s |')
            print(rows[-1], flush=True)
    print('\n'.join(rows))


if __name__ == '__main__':
    run(main)
