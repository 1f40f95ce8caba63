"""``fxopt prune --explain``: the dependency groups of a program and what pruning would remove from each."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fxopt.calibration import Calibration
from fxopt.ir.program import Program
from fxopt.passes.base import PassContext
from fxopt.prune.plan import plan_pruning

if TYPE_CHECKING:
    from fxopt.passes.prune_channels import PruneChannels

__all__ = ["explain"]


def explain(program: Program, options: PruneChannels, calibration: Calibration | None = None) -> str:
    """The dependency groups of ``program`` and what ``options`` would remove from each, DepGraph-style."""
    ctx = PassContext(options.name, calibration=calibration)
    plan = plan_pruning(program, options, ctx)
    lines = [f"{program.name}: {options}"]
    if plan is not None:
        lines.append(f"{len(plan.candidates)} prunable groups:")
        for i, c in enumerate(plan.candidates):
            kept = plan.counts[c.group.space]
            roles = f" [{', '.join(sorted(c.group.roles))}]" if c.group.roles else ""
            scores = c.importance.float()
            lines.append(
                f"  group {i}{roles}: {c.group.size} channels, keep {kept}; importance "
                f"min {scores.min():.3g} median {scores.median():.3g} max {scores.max():.3g}"
            )
            lines += [f"      {m}" for m in dict.fromkeys(f"{m.role:5} {m.label}" for m in c.group.members)]
    lines += ["notes:"] + [f"  {n}" for n in ctx.notes]
    return "\n".join(lines)
