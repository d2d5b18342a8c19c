"""Train MyModel on CIFAR-10 on the CPU (lessons P26-28).

    python train.py                      # 10 epochs, as in the tutorial
    python train.py --epochs 1 --data-dir path/to/images   # ROOT/train/<class>/, ROOT/test/<class>/
    python train.py --dry-run            # a few steps on fake data: checks the setup

Checkpoints go to model/, TensorBoard logs to logs/<run>/ (tensorboard --logdir logs).
"""
import torch
from torch import nn

from model import MyModel
from training.cli import run, training_parser
from training.data import load_data
from training.run import fit


def main(argv=None):
    args = training_parser(__doc__, epochs=10).parse_args(argv)
    device = torch.device('cpu')
    print(f'training device: {device}')

    data = load_data(args.data_dir, args.dry_run, args.batch_size, args.seed)
    torch.manual_seed(args.seed)  # same seed, same initial weights
    model = MyModel(num_classes=len(data.classes))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)  # 0 in the tutorial recipe

    fit(model, loss_fn, data, args, device)


if __name__ == '__main__':
    run(main)
