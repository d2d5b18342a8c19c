"""Train MyModel on CIFAR-10 on an NVIDIA GPU with .cuda() (lesson P29, "method one").

    python train_gpu_1.py                # 30 epochs, as in the tutorial
    python train_gpu_1.py --epochs 5 --batch-size 128

The model, the loss function and every batch are moved with .cuda() when CUDA is available;
without it the script says so and trains on the CPU. Checkpoints: model/; logs: logs/<run>/.
"""
import torch
from torch import nn

from model import MyModel
from training.cli import run, training_parser
from training.data import load_data
from training.run import fit


def main(argv=None):
    args = training_parser(__doc__, epochs=30).parse_args(argv)
    use_cuda = torch.cuda.is_available()
    device = torch.device('cuda' if use_cuda else 'cpu')
    print(f'training device: {device}' + ('' if use_cuda else
          ' (CUDA is not available, so .cuda() is skipped; train_gpu_2.py also knows Apple GPUs)'))

    data = load_data(args.data_dir, args.dry_run, args.batch_size, args.seed)
    torch.manual_seed(args.seed)  # same seed, same initial weights
    model = MyModel(num_classes=len(data.classes))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)  # 0 in the tutorial recipe
    if use_cuda:
        model = model.cuda()
        loss_fn = loss_fn.cuda()

    def to_gpu(images, targets):  # called on every batch
        if use_cuda:
            images, targets = images.cuda(non_blocking=True), targets.cuda(non_blocking=True)
        return images, targets

    fit(model, loss_fn, data, args, device, to_device=to_gpu)


if __name__ == '__main__':
    run(main)
