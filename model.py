"""MyModel: the tutorial's small CIFAR-10 CNN (lesson P26).

    python model.py      # checks the shapes: prints torch.Size([64, 10])

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


if __name__ == '__main__':
    # The tutorial's sanity check: a batch of 64 images in, 64 rows of 10 scores out.
    output = MyModel()(torch.ones(64, 3, 32, 32))
    print(output.shape)
