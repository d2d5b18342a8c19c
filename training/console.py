"""What a training run shows in the terminal: the text is made here, the scripts print it."""
import json

from .distributed import is_main_process
from .paths import command
from .platforms import can_show, progress_bar_class, progress_stream, shows_progress
from .recipe import describe_views
from .setup_check import setup_problems


def describe_run(args, data, train_batches, autocast, progress, run_dir) -> str:
    """The lines printed before the first epoch: data, plan, recipe, where things go."""
    resuming = f'; resuming {progress.resumed_from} at epoch {progress.epoch + 1}, step {progress.step}' \
        if progress.resumed_from else ''
    return '\n'.join([
        f'data: {data.source}: {len(data.train)} training and {len(data.test)} test images, '
        f'{len(data.classes)} classes, {type(train_batches).__name__}',
        f'{args.epochs} epochs of {len(train_batches)} steps (batch {args.batch_size}, lr {args.lr}, seed {args.seed}, '
        f'{autocast.name}{", channels_last" if args.channels_last else ""}'
        f'{", compiled" if args.compile else ""}{", deterministic" if args.deterministic else ""}){resuming}',
        f'recipe {args.recipe}: {describe_recipe(args)}',
        f'TensorBoard: {run_dir}/  checkpoints: {args.checkpoint_dir}/'])


def describe_recipe(args) -> str:
    sgd = f'SGD momentum {args.momentum}{" (Nesterov)" if args.nesterov else ""}' if args.momentum else 'plain SGD'
    whitened = f", the first kernel's steps whitened to the power {args.whiten_conv1}" if args.whiten_conv1 else ''
    parts = [sgd,
             f'weight decay {args.weight_decay}' if args.weight_decay else None,
             f'Muon for the kernels and first linear layer (lr {args.muon_lr}, decay {args.muon_decay}{whitened})'
             if args.muon_lr else None,
             f'{args.schedule} schedule' + (f' ({args.warmup:.0%} warm-up)' if args.warmup else ''),
             f'label smoothing {args.label_smoothing}' if args.label_smoothing else None,
             f'gradients clipped to norm {args.clip_grad}' if args.clip_grad else None,
             'normalised inputs' if args.normalize else None,
             f'random crops (padding {args.crop_padding})' if args.crop_padding else None,
             ('mirroring every other epoch' if args.alternate_flip else 'random mirroring') if args.flip else None,
             f'tested on {describe_views(args)} (TTA)' if args.tta else None]
    return ', '.join(p for p in parts if p)


def progress_bar(batches, epoch: int, done: int, args):
    """Epoch ``epoch``'s batches (after the ``done`` ones of a resumed epoch), with a progress bar in
    images -- images/s and time left -- in a terminal or a notebook; none in CI logs, pipes or files."""
    bar = progress_bar_class()  # a notebook's own bar where it can draw one
    return bar(batches.epoch(epoch, skip=done), desc=f'epoch {epoch + 1}/{args.epochs}', total=len(batches),
               initial=done, leave=False, unit='img', unit_scale=args.batch_size, dynamic_ncols=True,
               file=progress_stream(), disable=args.quiet or not shows_progress() or not is_main_process())


def epoch_line(epoch: int, epochs: int, train, test, path) -> str:
    return (f'epoch {epoch + 1:>3}/{epochs}  train loss {train.loss:.4f}  acc {train.accuracy:6.2%}  '
            f'| test loss {test.loss:.4f}  acc {test.accuracy:6.2%}  '
            f'| {train.seconds + test.seconds:5.1f}s  -> {path}')


def summary_line(args, progress, checkpoints, writer) -> str:
    total = writer.elapsed()
    line = (f'done in {total:.1f}s: best test accuracy {progress.best["accuracy"]:.2%} at epoch '
            f'{progress.best["epoch"] + 1} ({checkpoints.path / "best.pth"}); TensorBoard: '
            f'{command("tensorboard", "--logdir", writer.run_dir.parent)} (this run: {writer.run_dir.name}; '
            f'its logging took {writer.seconds:.1f}s, {writer.seconds / max(total, 1e-9):.1%} of the run)')
    if args.dry_run:
        line += '\ndry run OK: data, model, training, evaluation, TensorBoard and checkpoints all work'
        problems = setup_problems(args)
        if problems:
            line += (f'; but the setup check found {len(problems)} problem(s) to fix first (see above; '
                     f'环境检查发现 {len(problems)} 个问题，见上文)')
    return line


def json_text(document) -> str:
    """``document`` as JSON for stdout: Chinese names and file names as they are where the console's encoding
    has them, else as JSON's own \\u escapes (which every JSON reader turns back into the same text)."""
    text = json.dumps(document, ensure_ascii=False)
    return text if can_show(text) else json.dumps(document)
