"""The names a pipeline spec may use: passes (spec name -> class; built-in ones listed here, a user's added with
:func:`register_pass`) and named pipelines."""

import dataclasses
import re

from fxopt.errors import PipelineError
from fxopt.passes.awq import AWQ
from fxopt.passes.base import Pass
from fxopt.passes.convert_layout import ConvertLayout
from fxopt.passes.cse import CommonSubexpressionElimination
from fxopt.passes.dce import DeadCodeElimination
from fxopt.passes.fold_constants import FoldConstants
from fxopt.passes.fold_conv_bn import FoldConvBN
from fxopt.passes.fuse_attention import FuseAttention
from fxopt.passes.fuse_blocks import FuseBlocks
from fxopt.passes.fuse_norms import FuseNorms
from fxopt.passes.layernorm_to_rmsnorm import LayerNormToRMSNorm
from fxopt.passes.mark_epilogues import MarkEpilogues
from fxopt.passes.prune_channels import PruneChannels
from fxopt.passes.quantize import Quantize
from fxopt.passes.remove_noops import RemoveNoops
from fxopt.passes.shift_activations import ShiftActivations
from fxopt.passes.smooth_activations import SmoothActivations

__all__ = ["BUILTIN_PIPELINES", "PASSES", "register_pass"]

# Named pipelines, usable wherever a pass name is. The per-target defaults are
# the exact rewrites; lossy ones (pruning, quantization) are always asked for.
BUILTIN_PIPELINES: dict[str, str] = {
    "cleanup": "remove-noops,fold-constants,cse,dce",
    "default": "remove-noops,fold-constants,fuse-norms,fold-conv-bn,fuse-blocks,fuse-attention,cse,dce,mark-epilogues",
    # Opt-in: exact, and faster where RMSNorm is one kernel (compiled backends), slower in eager PyTorch on CPU.
    "pre-rmsnorm": "remove-noops,fold-constants,fuse-norms,layernorm-to-rmsnorm,fold-conv-bn,fuse-blocks,"
    "fuse-attention,cse,dce,mark-epilogues",
    "torch": "default",
    # CPUs: CNNs in the blocked layout their convolution kernels read (exact; slower in PyTorch, hence not default).
    "cpu": "remove-noops,fold-constants,fuse-norms,fold-conv-bn,fuse-blocks,fuse-attention,convert-layout,cse,dce,"
    "mark-epilogues",
    "cuda": "default",
}

PASSES: dict[str, type[Pass]] = {
    "awq": AWQ,
    "convert-layout": ConvertLayout,
    "cse": CommonSubexpressionElimination,
    "dce": DeadCodeElimination,
    "fold-constants": FoldConstants,
    "fold-conv-bn": FoldConvBN,
    "fuse-attention": FuseAttention,
    "fuse-blocks": FuseBlocks,
    "fuse-norms": FuseNorms,
    "layernorm-to-rmsnorm": LayerNormToRMSNorm,
    "mark-epilogues": MarkEpilogues,
    "prune-channels": PruneChannels,
    "quantize": Quantize,
    "remove-noops": RemoveNoops,
    "shift-activations": ShiftActivations,
    "smooth-activations": SmoothActivations,
}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Make a pass of your own usable by its ``name`` in spec strings, TOML pipeline files and the ``fxopt``
    command (register it in the model file the command loads). Returns ``cls``: works as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Pass) and dataclasses.is_dataclass(cls)):
        raise PipelineError(f"register_pass takes a Pass subclass that is a dataclass, got {cls!r}")
    name = cls.name
    if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", name):
        raise PipelineError(
            f"{cls.__name__}.name must be a kebab-case spec name like 'fold-double-negation', got {name!r}"
        )
    taken = "a named pipeline" if name in BUILTIN_PIPELINES else PASSES.get(name, cls) is not cls and PASSES[name]
    if taken:
        raise PipelineError(
            f"cannot register {cls.__name__} as '{name}': the name is taken by "
            f"{taken if isinstance(taken, str) else taken.__qualname__}"
        )
    PASSES[name] = cls
    return cls
