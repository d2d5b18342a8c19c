"""Train MyModel on CIFAR-10 on the best device there is, with .to(device) (lesson P30, "method two").

    python train_gpu_2.py                # 30 epochs on cuda, else mps (Apple), else cpu
    python train_gpu_2.py --device cpu --epochs 3

The device is chosen once; the model, the loss function and every batch are moved to it with
.to(device). Checkpoints: model/; logs: logs/<run>/ (tensorboard --logdir logs).
"""
import torch
from torch import nn

from model import MyModel
from training.cli import run, training_parser
from training.data import load_data
from training.device import select_device
from training.run import fit


def main(argv=None):
    args = training_parser(__doc__, epochs=30, device_flag=True).parse_args(argv)
    device = select_device(args.device)  # auto: cuda -> mps -> cpu
    print(f'training device: {device}')

    data = load_data(args.data_dir, args.dry_run, args.batch_size, args.seed)
    torch.manual_seed(args.seed)  # same seed, same initial weights
    model = MyModel(num_classes=len(data.classes))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)  # 0 in the tutorial recipe
    model = model.to(device)
    loss_fn = loss_fn.to(device)

    def to_device(images, targets):  # called on every batch
        return images.to(device, non_blocking=True), targets.to(device, non_blocking=True)

    fit(model, loss_fn, data, args, device, to_device=to_device)


if __name__ == '__main__':
    run(main)
