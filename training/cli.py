"""The command line shared by train.py, train_gpu_1.py and train_gpu_2.py, and the error handling
that turns a problem the user can fix into one clear line on stderr (exit code 2, no traceback)."""
import argparse
import sys


class UserError(Exception):
    """Something the user can fix (a missing file, a bad flag): printed as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported on one line instead of usage + error."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


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


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number, got {text!r}') from None
    if not value > 0 or value == float('inf'):
        raise argparse.ArgumentTypeError(f'must be a positive number, got {text}')
    return value


def training_parser(description: str, epochs: int, device_flag: bool = False) -> ArgumentParser:
    """The flags of every training script; the defaults are the tutorial's."""
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--epochs', type=positive_int, default=epochs,
                   help=f'passes over the training set (default: {epochs}, as in the tutorial)')
    p.add_argument('--batch-size', type=positive_int, default=64, help='images per step (default: 64)')
    p.add_argument('--lr', type=positive_float, default=0.01, help='SGD learning rate (default: 0.01)')
    p.add_argument('--data-dir', default='dataset',
                   help='CIFAR-10 folder (downloaded there when missing), or a folder with train/<class>/ '
                        'and test/<class>/ images (default: dataset)')
    p.add_argument('--log-dir', default=None,
                   help='TensorBoard folder; each run writes to its own subfolder (default: logs)')
    p.add_argument('--run-name', default=None,
                   help="name of this run's subfolder of --log-dir (default: date, time and script)")
    p.add_argument('--checkpoint-dir', default=None,
                   help='where model_{epoch}.pth, best.pth and last.pth go (default: model)')
    p.add_argument('--seed', type=int, default=0,
                   help='seed for the initial weights and the data order: same seed, same run (default: 0)')
    p.add_argument('--num-workers', type=non_negative_int, default=0,
                   help='DataLoader worker processes for decoding images (default: 0, the main process)')
    p.add_argument('--log-interval', type=positive_int, default=100,
                   help='log the mean train loss every this many steps (default: 100)')
    p.add_argument('--resume', nargs='?', const='latest', metavar='PATH',
                   help='continue an interrupted run from --checkpoint-dir/last.pth, or from PATH, with its '
                        'settings; --epochs is the total to reach')
    p.add_argument('--dry-run', '--fake-data', action='store_true',
                   help='check the setup: at most 2 epochs of 4 steps on random FakeData; checkpoints and logs '
                        'go to a temporary folder unless --checkpoint-dir / --log-dir are given')
    p.add_argument('--quiet', action='store_true', help='print only the final summary and errors')
    p.add_argument('--loader', choices=['auto', 'memory', 'stream'], default='auto',
                   help='memory: decode the data set once into one tensor on the device (fast); stream: a '
                        'DataLoader reads every image every epoch (for data that does not fit); auto: memory '
                        'when it takes under a quarter of free memory (default: auto)')
    p.add_argument('--precision', choices=['auto', 'fp32', 'bf16'], default='auto',
                   help='bf16 autocast roughly doubles the speed where the hardware does bf16 natively; '
                        'auto = bf16 there (recent NVIDIA GPUs, CPUs with AVX512-BF16 or AMX), else fp32')
    p.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=True,
                   help='NHWC memory layout, which the fast convolution kernels want (default: on)')
    p.add_argument('--cudnn-benchmark', action=argparse.BooleanOptionalAction, default=True,
                   help='let cuDNN time its convolution algorithms once and keep the fastest (default: on)')
    p.add_argument('--compile', action='store_true',
                   help='torch.compile the model: faster steps on a GPU after a minute of compiling')
    if device_flag:
        p.add_argument('--device', choices=['auto', 'cpu', 'cuda', 'mps'], default='auto',
                       help='where to train; auto picks cuda, then mps, then cpu (default: auto)')
    return p


def run(main) -> None:
    """Call main(); report a UserError as one line on stderr with exit code 2."""
    try:
        main()
    except UserError as e:
        message = str(e)
        if 'Original Traceback' in message:  # raised in a DataLoader worker: keep the error's own line
            message = message.strip().splitlines()[-1].split('UserError: ', 1)[-1]
        print(f'error: {message}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # a second Ctrl+C, or one outside training: stop at once
        print('interrupted', file=sys.stderr)
        sys.exit(130)
