"""Graph passes and the pass registry.

Every pass is a frozen dataclass in a file of its own; :data:`PASSES` maps each
pass's spec name to its class and is the one place a pass is registered:
built-in ones below, a user's with :func:`register_pass`.
"""

import dataclasses
import re

from fxopt.errors import PipelineError
from fxopt.ir.numerics import Tolerance
from fxopt.passes.awq import AWQ
from fxopt.passes.base import Option, Pass, PassContext, option
from fxopt.passes.cse import CommonSubexpressionElimination
from fxopt.passes.dce import DeadCodeElimination
from fxopt.passes.fold_constants import FoldConstants
from fxopt.passes.fold_conv_bn import FoldConvBN
from fxopt.passes.fuse_attention import FuseAttention
from fxopt.passes.fuse_blocks import FuseBlocks
from fxopt.passes.fuse_norms import FuseNorms
from fxopt.passes.layernorm_to_rmsnorm import LayerNormToRMSNorm
from fxopt.passes.manager import PassManager, PassRecord
from fxopt.passes.mark_epilogues import MarkEpilogues
from fxopt.passes.pipeline import Pipeline
from fxopt.passes.prune_channels import PruneChannels
from fxopt.passes.quantize import Quantize
from fxopt.passes.remove_noops import RemoveNoops
from fxopt.passes.shift_activations import ShiftActivations
from fxopt.passes.smooth_activations import SmoothActivations
from fxopt.passes.spec import BUILTIN_PIPELINES, parse_pipeline

PASSES: dict[str, type[Pass]] = {
    "awq": AWQ,
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
        raise PipelineError(f"{cls.__name__}.name must be a kebab-case spec name like 'fold-double-negation', "
                            f"got {name!r}")
    taken = "a named pipeline" if name in BUILTIN_PIPELINES else PASSES.get(name, cls) is not cls and PASSES[name]
    if taken:
        raise PipelineError(f"cannot register {cls.__name__} as '{name}': the name is taken by "
                            f"{taken if isinstance(taken, str) else taken.__qualname__}")
    PASSES[name] = cls
    return cls


__all__ = [
    "BUILTIN_PIPELINES",
    "PASSES",
    "Option",
    "Pass",
    "PassContext",
    "PassManager",
    "PassRecord",
    "Pipeline",
    "Tolerance",
    "option",
    "parse_pipeline",
    "register_pass",
]
