"""MyModel: the tutorial's small CIFAR-10 CNN (lesson P26).

    python model.py      # checks the shapes: prints torch.Size([64, 10]), then each layer's output
                         # shape, parameters and multiply-adds (where 64*4*4 comes from)

The layers and their names are exactly the tutorial's (everything inside a ``Sequential``
called ``model``), so a ``state_dict`` saved by the tutorial's own code loads unchanged.
"""
import torch
from torch import nn


class MyModel(nn.Module):
    """Three 5x5 conv + max-pool stages, then two linear layers: 3x32x32 images -> class scores."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(3, 32, kernel_size=5, stride=1, padding=2),   # 32x32x32
            nn.MaxPool2d(2),                                          # 32x16x16
            nn.Conv2d(32, 32, kernel_size=5, stride=1, padding=2),  # 32x16x16
            nn.MaxPool2d(2),                                          # 32x8x8
            nn.Conv2d(32, 64, kernel_size=5, stride=1, padding=2),  # 64x8x8
            nn.MaxPool2d(2),                                          # 64x4x4
            nn.Flatten(),                                             # 1024
            nn.Linear(64 * 4 * 4, 64),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def layer_table(model: nn.Module) -> str:
    """One row per layer for one 3x32x32 image: output shape, parameters, multiply-adds; then the totals."""
    rows, x = [], torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        for index, layer in enumerate(model.model):
            x = layer(x)
            params = sum(p.numel() for p in layer.parameters())
            if isinstance(layer, nn.Conv2d):  # each output value: in_channels x kernel height x kernel width
                macs = x[0].numel() * layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
            elif isinstance(layer, nn.Linear):
                macs = layer.in_features * layer.out_features
            else:
                macs = 0
            rows.append((f'model.{index}', type(layer).__name__, ' x '.join(map(str, x.shape[1:])), params, macs))
    lines = [f'{"layer":9} {"type":10} {"output (one image)":>20} {"parameters":>11} {"multiply-adds":>14}']
    lines += [f'{name:9} {kind:10} {shape:>20} {params:>11,} {macs:>14,}' for name, kind, shape, params, macs in rows]
    lines.append(f'{"total":9} {"":10} {"":>20} {sum(r[3] for r in rows):>11,} {sum(r[4] for r in rows):>14,}')
    return '\n'.join(lines)


if __name__ == '__main__':
    # The tutorial's sanity check: a batch of 64 images in, 64 rows of 10 scores out.
    output = MyModel()(torch.ones(64, 3, 32, 32))
    print(output.shape)
    # Each max-pool halves the size: 32 -> 16 -> 8 -> 4, so Flatten gets 64 channels x 4 x 4 = 1024 values.
    print(layer_table(MyModel()))
