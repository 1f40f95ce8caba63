"""Convolution times per block pair: how tuning (``fxopt.codegen.block_costs``) tells ``convert-layout`` what each
convolution costs with each ``(input block, output block)`` of the blocked layout NCHW[x]c.

A file of them is JSON: ``{geometry: {"x,y": microseconds}}``, the geometry as :func:`conv_geometry_key` writes it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

__all__ = ["BlockCosts", "conv_geometry_key", "read_block_costs", "write_block_costs"]

#: Microseconds by :func:`conv_geometry_key`, then by ``(input block, output block)``.
BlockCosts = dict[str, dict[tuple[int, int], float]]


def conv_geometry_key(
    batch: int,
    channels: int,
    height: int,
    width: int,
    out_channels: int,
    kernel: Sequence[int],
    stride: Sequence[int],
    sides: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> str:
    """How block costs name a convolution: ``1x64x56x56x64x3x3x1x1x1x1x1x1x1x1x1`` (its input's shape, output
    channels, kernel, stride, padding top/left/bottom/right, dilation, groups)."""
    fields = (batch, channels, height, width, out_channels, *kernel, *stride, *sides, *dilation, groups)
    return "x".join(map(str, fields))


def read_block_costs(path: str | Path) -> BlockCosts:
    """The block costs in the file ``path``; raises ``ValueError`` naming it if it holds none."""
    try:
        costs: BlockCosts = {}
        for key, pairs in json.loads(Path(path).read_text()).items():
            costs[key] = {}
            for pair, us in pairs.items():
                x, y = map(int, pair.split(","))
                if min(x, y) < 1:
                    raise ValueError(f"block pair {pair!r}")
                costs[key][x, y] = float(us)
        return costs
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path} is not a file of convolution block costs ({exc})") from None


def write_block_costs(path: str | Path, costs: BlockCosts) -> None:
    """Write ``costs`` to ``path`` whole or not at all (through a temporary file), should the process die."""
    entries = {key: {f"{x},{y}": us for (x, y), us in sorted(pairs.items())} for key, pairs in sorted(costs.items())}
    temporary = Path(f"{path}.tmp")
    temporary.write_text(json.dumps(entries, indent=1) + "\n")
    temporary.replace(path)
