"""RepVGG: a multi-branch network for training becomes a plain stack of 3x3 convs for inference.

Each RepVGG block (Ding et al., 2021) sums a 3x3 conv+BN, a 1x1 conv+BN and,
where the shape allows, an identity BN. fxopt's default pipeline folds every
BatchNorm into its conv (``fold-conv-bn``) and merges the branches into one
3x3 conv (``fuse-blocks``): the optimized model is a VGG-like chain of conv +
ReLU computing the same function.

Run: python examples/repvgg.py
Also a model for the CLI and the benchmarks:
    fxopt optimize examples/repvgg.py:repvgg_a0 --target torch
    python benchmarks/run.py examples/repvgg.py:repvgg_a0
"""

import time

import torch
import torch.nn as nn

import fxopt


def _trained(norm: nn.BatchNorm2d, generator: torch.Generator) -> nn.BatchNorm2d:
    """Statistics and affine parameters as after training (a fresh BatchNorm is an identity)."""
    c = norm.num_features
    norm.running_mean = torch.randn(c, generator=generator) * 0.1
    norm.running_var = torch.rand(c, generator=generator) + 0.5
    norm.weight.data = torch.rand(c, generator=generator) + 0.5
    norm.bias.data = torch.randn(c, generator=generator) * 0.1
    return norm


class RepVGGBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, generator: torch.Generator):
        super().__init__()

        def conv_bn(kernel: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), _trained(nn.BatchNorm2d(cout), generator)
            )

        self.dense, self.pointwise = conv_bn(3), conv_bn(1)
        self.identity = _trained(nn.BatchNorm2d(cin), generator) if cin == cout and stride == 1 else None

    def forward(self, x):
        y = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return y.relu()


class RepVGG(nn.Module):
    def __init__(self, depths: tuple[int, ...], widths: tuple[int, ...], classes: int = 1000, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        blocks = [RepVGGBlock(3, widths[0], 2, generator)]
        cin = widths[0]
        for depth, width in zip(depths, widths[1:]):
            for i in range(depth):
                blocks.append(RepVGGBlock(cin, width, 2 if i == 0 else 1, generator))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(self.blocks(x).mean((2, 3)))


def repvgg_a0() -> tuple[nn.Module, tuple]:
    """RepVGG-A0 (depths 2-4-14-1, width multipliers 0.75 and 2.5), 1x3x224x224."""
    model = RepVGG((2, 4, 14, 1), (48, 48, 96, 192, 1280))
    return model.eval(), (torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)),)


def repvgg_tiny() -> tuple[nn.Module, tuple]:
    """Four one- and two-block stages, 1x3x32x32: for tests and quick tries."""
    model = RepVGG((1, 2, 2, 1), (8, 8, 16, 16, 32), classes=10)
    return model.eval(), (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)


def _median_ms(fn, inputs, rounds: int = 30) -> float:
    with torch.no_grad():
        fn(*inputs)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn(*inputs)
            times.append(time.perf_counter() - start)
    return sorted(times)[rounds // 2] * 1e3


if __name__ == "__main__":
    model, inputs = repvgg_tiny()
    optimized = fxopt.optimize(model, inputs, target="torch")
    print(optimized.report())
    convs = [n for n in optimized.graph_module.graph.nodes if n.target is torch.ops.aten.convolution.default]
    print(f"{len(model.blocks)} RepVGG blocks (two or three branches each) -> {len(convs)} convs")
    print(
        f"eager PyTorch: {_median_ms(model, inputs):.2f} ms as trained, "
        f"{_median_ms(optimized, inputs):.2f} ms re-parameterized (median of 30 calls, this machine)"
    )
