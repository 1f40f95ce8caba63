"""ResNeXt: ResNet's bottleneck with its 3x3 convolution split into 32 groups (Xie et al., 2017).

ResNeXt-50 32x4d's grouped 3x3 convolutions have 4 to 32 channels a group. fxopt's ``cpu`` pipeline keeps them
in the blocked layout NCHW[x]c with the rest of the network; where a group is narrower than a block of channels
(4 channels, blocks of 8 on AVX2), the kernel computes the groups a block spans as one, with zeros between them.

Run: python examples/resnext.py
Also a model for the CLI and the benchmarks:
    fxopt optimize examples/resnext.py:resnext50_32x4d
    python benchmarks/run.py examples/resnext.py:resnext50_32x4d
"""

import torch
import torch.nn as nn

import fxopt


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)
    )


class Bottleneck(nn.Module):
    """1x1 down to ``width``, grouped 3x3 (the stride, as torchvision's v1.5), 1x1 up to ``cout``, the residual."""

    def __init__(self, cin: int, width: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.reduce = conv_bn(cin, width, 1)
        self.grouped = conv_bn(width, width, 3, stride, groups)
        self.expand = conv_bn(width, cout, 1)
        self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        y = self.grouped(self.reduce(x).relu()).relu()
        return (self.expand(y) + self.shortcut(x)).relu()


class ResNeXt(nn.Module):
    def __init__(self, depths, groups: int, group_width: int, stem: int = 64, classes: int = 1000, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(conv_bn(3, stem, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], stem
        for stage, depth in enumerate(depths):
            width, cout = groups * group_width * 2**stage, stem * 4 * 2**stage
            for i in range(depth):
                blocks.append(Bottleneck(cin, width, cout, 2 if i == 0 and stage > 0 else 1, groups))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def resnext50_32x4d() -> tuple[nn.Module, tuple]:
    """ResNeXt-50 32x4d (depths 3-4-6-3, 32 groups of 4 channels in the first stage), 1x3x224x224."""
    model = ResNeXt((3, 4, 6, 3), groups=32, group_width=4)
    return model.eval(), (torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)),)


def resnext_tiny() -> tuple[nn.Module, tuple]:
    """Two one-block stages of 4 groups of 4 channels, 1x3x32x32: for tests and quick tries."""
    model = ResNeXt((1, 1), groups=4, group_width=4, stem=8, classes=10)
    return model.eval(), (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)


if __name__ == "__main__":
    model, inputs = resnext_tiny()
    optimized = fxopt.optimize(model, inputs, target="cpu")
    print(optimized.report())
    with torch.no_grad():
        error = (optimized(*inputs) - model(*inputs)).abs().max().item()
    print(f"largest difference from the model: {error:.2e}")
