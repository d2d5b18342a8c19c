"""The command line: the flags every training script takes, and the one place where an error becomes a
message and an exit code (``run``). A problem the user can fix is one line on stderr, exit code 2, no
traceback."""
import argparse
import sys

from .distributed import is_main_process, leave_process_group, world_size
from .errors import Interrupted, UnreadableImage, UserError
from .platforms import prepare_console, release_stdout, script_arguments
from .recipe import RECIPES, shown


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported on one line instead of usage + error, and ``parse_args()`` reads
    the command line's own arguments, not a notebook kernel's (see platforms.script_arguments)."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')

    def parse_args(self, args=None, namespace=None):
        return super().parse_args(script_arguments() if args is None else args, namespace)


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a whole number, got {text!r}') from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f'must be at least {minimum}, got {value}')
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def _number(text: str, accept, requirement: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number, got {text!r}') from None
    if not accept(value):  # NaN fails every comparison, so it is refused too
        raise argparse.ArgumentTypeError(f'must be {requirement}, got {text}')
    return value


def fraction(text: str) -> float:
    return _number(text, lambda v: 0 <= v < 1, 'at least 0 and less than 1')


def non_negative_float(text: str) -> float:
    return _number(text, lambda v: 0 <= v < float('inf'), 'a number >= 0')


def positive_float(text: str) -> float:
    return _number(text, lambda v: 0 < v < float('inf'), 'a positive number')


def training_parser(prog: str, description: str, epochs: int, device_flag: bool = False) -> ArgumentParser:
    """The flags of every training script; the defaults are the tutorial's."""
    p = ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--epochs', type=positive_int, default=None,  # None: not given (see settings.py)
                   help=f'passes over the training set (default: {epochs}, as in the tutorial; with --resume, '
                        f'those of the interrupted run)')
    recipe_flags(p)
    p.add_argument('--data-dir', default=None,
                   help='CIFAR-10 folder (downloaded there when missing), or a folder with train/<class>/ '
                        "and test/<class>/ images (default: the project's dataset/, beside the scripts)")
    p.add_argument('--log-dir', default=None,
                   help="TensorBoard folder; each run writes to its own subfolder (default: the project's logs/)")
    p.add_argument('--run-name', default=None,
                   help="name of this run's subfolder of --log-dir (default: date, time and script); a name "
                        "already taken gets -2, -3, ... so that two runs never write into one folder")
    p.add_argument('--checkpoint-dir', default=None,
                   help='where model_{epoch}.pth, best.pth and last.pth go; one run at a time trains into it '
                        "(default: the project's model/)")
    p.add_argument('--seed', type=int, default=0,
                   help='seed for the initial weights, the data order and the augmentation: same seed, same run '
                        '(default: 0)')
    p.add_argument('--val-size', type=non_negative_int, default=0,
                   help='hold out this many training images (the same ones for every --seed) and evaluate on them '
                        'instead of the test split: tune settings there, so that the test accuracy stays an '
                        'honest estimate (default: 0, evaluate on the test split)')
    p.add_argument('--num-workers', type=non_negative_int, default=0,
                   help='DataLoader worker processes for decoding images (default: 0, the main process)')
    p.add_argument('--log-interval', type=positive_int, default=100,
                   help='log the mean train loss every this many steps (default: 100)')
    p.add_argument('--resume', nargs='?', const='latest', metavar='PATH',
                   help='continue an interrupted run from --checkpoint-dir/last.pth, or from PATH, with its '
                        'settings, to its last epoch; --epochs N trains on to a total of N')
    p.add_argument('--dry-run', '--fake-data', action='store_true',
                   help='check the setup: at most 2 epochs of 4 steps on random FakeData; checkpoints and logs '
                        'go to a temporary folder unless --checkpoint-dir / --log-dir are given')
    p.add_argument('--quiet', action='store_true', help='print only the final summary and errors')
    p.add_argument('--loader', choices=['auto', 'memory', 'stream'], default='auto',
                   help='memory: decode the data set once into one tensor on the device (fast); stream: a '
                        'DataLoader reads every image every epoch (for data that does not fit); auto: memory '
                        'when it takes under a quarter of free memory (default: auto)')
    p.add_argument('--precision', choices=['auto', 'fp32', 'bf16', 'fp16'], default='auto',
                   help='bf16 autocast roughly doubles the speed where the hardware does bf16 natively; '
                        'auto = bf16 there (recent NVIDIA GPUs, CPUs with AVX512-BF16 or AMX), fp16 with gradient '
                        'scaling on GPUs that do fp16 fast but not bf16 (T4, GTX 16, RTX 20), else fp32')
    p.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=True,
                   help='NHWC memory layout, which the fast convolution kernels want (default: on)')
    p.add_argument('--cudnn-benchmark', action=argparse.BooleanOptionalAction, default=True,
                   help='let cuDNN time its convolution algorithms once and keep the fastest (default: on)')
    p.add_argument('--deterministic', action='store_true',
                   help="PyTorch's deterministic algorithms and no cuDNN autotuning, so that on a GPU a rerun or a "
                        '--resume repeats exactly (the CPU always does); slower on a GPU')
    p.add_argument('--compile', action='store_true',
                   help='torch.compile the model: faster steps on a GPU after some compiling (it needs Triton on '
                        'an NVIDIA GPU, a C++ compiler on the CPU)')
    if device_flag:
        p.add_argument('--device', choices=['auto', 'cpu', 'cuda', 'mps'], default='auto',
                       help='where to train; auto picks cuda, then mps (Apple; not with train_ddp.py), then cpu '
                            '(default: auto)')
    return p


def recipe_flags(p: ArgumentParser) -> None:
    """--recipe, and one flag per ingredient; each flag's default comes from the recipe (see recipe.py)."""
    def default(key):
        return f'(tutorial: {shown(RECIPES["tutorial"][key])}, fast: {shown(RECIPES["fast"][key])})'

    switch = argparse.BooleanOptionalAction
    p.add_argument('--recipe', choices=list(RECIPES), default='tutorial',
                   help='tutorial: the lessons\' plain SGD; fast: the same MyModel trained well (its accuracy: '
                        'BENCHMARKS.md). Sets the defaults of the flags below (default: tutorial)')
    p.add_argument('--batch-size', type=positive_int, help=f'images per step {default("batch_size")}')
    p.add_argument('--lr', type=positive_float,
                   help=f'SGD learning rate; the peak rate with a schedule {default("lr")}')
    p.add_argument('--momentum', type=non_negative_float, help=f'SGD momentum {default("momentum")}')
    p.add_argument('--nesterov', action=switch, help=f'Nesterov momentum {default("nesterov")}')
    p.add_argument('--weight-decay', type=non_negative_float,
                   help=f'L2 penalty on weights (not biases) {default("weight_decay")}')
    p.add_argument('--muon-lr', type=non_negative_float, metavar='LR',
                   help='the kernels and first linear layer step by Muon (orthogonalised momentum) at this peak rate '
                        f'instead of by SGD; 0: SGD for every weight {default("muon_lr")}')
    p.add_argument('--muon-decay', type=non_negative_float, metavar='WD',
                   help=f'with --muon-lr, their weights shrink by lr * WD each step {default("muon_decay")}')
    p.add_argument('--whiten-conv1', type=non_negative_float, metavar='POWER',
                   help='with --muon-lr, the first convolution steps as if its 5x5 input patches were whitened: its '
                        'steps preconditioned by C^-POWER, C their covariance over 500 training images; 0: off, '
                        f'0.5: fully whitened {default("whiten_conv1")}')
    p.add_argument('--schedule', choices=['constant', 'onecycle', 'cosine'],
                   help='learning rate over the run: constant; onecycle (linear warm-up to --lr, then linear to 0); '
                        f'cosine (warm-up, then a cosine to 0) {default("schedule")}')
    p.add_argument('--warmup', type=fraction, help=f'fraction of the steps spent warming up {default("warmup")}')
    p.add_argument('--label-smoothing', type=fraction,
                   help=f'train towards (1 - x) confidence instead of certainty {default("label_smoothing")}')
    p.add_argument('--clip-grad', type=non_negative_float, metavar='NORM',
                   help=f'scale the gradients down to at most this norm; 0: never {default("clip_grad")}')
    p.add_argument('--normalize', action=switch,
                   help=f'per-channel mean/std normalisation, stored in the checkpoints {default("normalize")}')
    p.add_argument('--crop-padding', type=non_negative_int,
                   help=f'random crops of the images padded by this many pixels; 0: none {default("crop_padding")}')
    p.add_argument('--flip', action=switch, help=f'random horizontal mirroring {default("flip")}')
    p.add_argument('--alternate-flip', action=switch,
                   help='with --flip, each image mirrored in every other epoch (a random half in the first) '
                        f'instead of at random every epoch {default("alternate_flip")}')
    p.add_argument('--tta', action=switch,
                   help=f'evaluate on several views of each image (--tta-views), averaged {default("tta")}')
    p.add_argument('--tta-views', type=int, choices=[2, 3, 6],
                   help='with --tta, the views averaged: 2, the image and its mirror image; 3, the image and its '
                        'mirror image moved --tta-shift pixels right and left; 6, the image and its mirror image, '
                        f'each also moved right and left {default("tta_views")}')
    p.add_argument('--tta-shift', type=non_negative_int, metavar='PIXELS',
                   help=f'how far --tta-views 3 and 6 move the copies; 0: not at all (2 views) {default("tta_shift")}')
    p.add_argument('--tta-diagonal', action=switch,
                   help='with --tta-views 3 and 6, move the copies diagonally, right and down and left and up, '
                        f'instead of right and left {default("tta_diagonal")}')


def lost_contact(e: BaseException) -> bool:
    """A collective failed because another process of the run is gone (or hangs)."""
    import torch.distributed as dist
    return world_size() > 1 and (isinstance(e, dist.DistError) or
                                 (isinstance(e, RuntimeError) and any(w in str(e) for w in ('gloo', 'NCCL'))))


def compile_failure(e: BaseException):
    """torch.compile's own error (no C++ compiler or Triton where the check before training did not see it
    coming, a compiler that fails): its first line, or None for any other error."""
    if not (type(e).__module__ or '').startswith(('torch._dynamo', 'torch._inductor')):
        return None
    inner = getattr(e, 'inner_exception', None) or e  # BackendCompilerFailed wraps the compiler's error
    text = str(inner).strip()
    return f'{type(inner).__name__}: {text.splitlines()[0] if text else "no message"}'[:300]


def run(main) -> None:
    """Call main() as the command line does: what stops it early becomes one line on stderr and an exit code.
    Every line printed is written at once, also into a pipe or a notebook, and what the console's encoding
    cannot show is escaped, never an error (see platforms.prepare_console)."""
    prepare_console()
    message, code, everywhere = None, 0, False
    try:
        main()
    except UserError as e:
        message, code, everywhere = f'error: {e}', 2, isinstance(e, UnreadableImage)
    except Interrupted as e:  # Ctrl+C or SIGTERM, after the training state was saved
        message, code = str(e), e.exit_code
    except KeyboardInterrupt:  # a second Ctrl+C, or one outside training: stop at once
        message, code = 'interrupted', 130
    except BrokenPipeError:  # `python train.py | head`: the reader left, so stop as other command-line tools do
        release_stdout()  # no second error when Python exits
        message, code, everywhere = ('stopped: the output pipe was closed; every checkpoint written so far is '
                                     'complete (continue a training run with --resume)'), 141, True  # 128 + SIGPIPE
    except Exception as e:
        failure = compile_failure(e)
        if failure:
            message, code = (f'error: --compile: torch.compile failed ({failure}); run without --compile (the '
                             f'checkpoints written so far are complete)'), 2
        elif lost_contact(e):
            message, code = ('stopped: another process of this run failed or was killed (its error, if it printed '
                             "one, and torchrun's report say which); the checkpoints written so far are complete "
                             '(continue with --resume)'), 1
        else:
            raise
    # here, after the except clauses, main()'s frames (and train_ddp.py's model) are gone
    speaks = everywhere or is_main_process()  # in a run of several processes, rank 0 speaks for all (the others
    # would repeat it), except of what only one process can know; asked before the process group is left
    if code != 1:  # a group that lost a process cannot be shut down in order
        leave_process_group()
    if message:
        if speaks:
            try:
                print(message, file=sys.stderr)
            except BrokenPipeError:
                pass
        sys.exit(code)
