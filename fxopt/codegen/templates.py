"""Tuning fxopt's hand-scheduled kernel templates (:mod:`fxopt.codegen.x86`) per kernel shape.

A template has a few parameters and no search space for MetaSchedule: the float32 GEMM's register tile and the
weight panels each task runs its row tile over. Their analytic defaults from the target's
:class:`~fxopt.codegen.isa.Isa` (:func:`~fxopt.codegen.x86.dense_tile`,
:func:`~fxopt.codegen.x86.default_panels_per_task`) are best on BERT-base's shapes here, but not on every shape
(measured on a 2-core Zen 3: MiniLM's 192x384x384 1.10-1.14x with 6x2 tiles, decoding's 1x768x3072 1.05x with
2x6). Tuning (:func:`fxopt.codegen.tune.tune`) times every candidate (:func:`dense_candidates`) of each GEMM
shape the model has and stores the fastest in ``templates.json`` in the target's tuning database directory.
Lowering reads it (:class:`TemplateChoices`): tuned shapes get their choice, the others the default. A file
that is not what this module wrote is ignored with a warning: a build never fails because of the cache.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from fxopt.codegen import x86
from fxopt.codegen.isa import Isa
from fxopt.codegen.tuning_database import TEMPLATES_FILE

__all__ = [
    "TemplateChoices",
    "DenseChoice",
    "dense_candidates",
    "template_shapes",
]

logger = logging.getLogger("fxopt.codegen.tune")


@dataclass(frozen=True)
class DenseChoice:
    """A float32 GEMM's schedule parameters and, when measured, its time."""

    tile: x86.DenseTile
    panels_per_task: int
    us: float | None = None

    def __str__(self) -> str:
        return f"{self.tile.rows}x{self.tile.vectors} tile, {self.panels_per_task} panels per task"


@dataclass
class TemplateChoices:
    """Tuned template parameters by GEMM shape ``(rows, in_features, out_features)``; a shape not in it gets
    the analytic default."""

    dense: dict[tuple[int, int, int], DenseChoice] = field(default_factory=dict)

    def dense_schedule(self, rows: int, in_features: int, out_features: int, isa: Isa) -> DenseChoice:
        """The GEMM's schedule on ``isa``: the tuned one, unless it is for other vectors (a database copied
        from another machine), else the default."""
        tile = x86.dense_tile(isa)
        tuned = self.dense.get((rows, in_features, out_features))
        if tuned is not None and tuned.tile.lanes == tile.lanes:
            return tuned
        return DenseChoice(tile, x86.default_panels_per_task(in_features, tile, isa.l2_bytes))

    @classmethod
    def load(cls, database_dir: Path | None) -> TemplateChoices:
        """The choices stored in ``database_dir`` (none when it is ``None`` or holds no file)."""
        file = Path(database_dir) / TEMPLATES_FILE if database_dir is not None else None
        if file is None or not file.exists():
            return cls()
        try:
            entries = json.loads(file.read_text())["dense_f32"]
            dense = {}
            for shape, entry in entries.items():
                rows, in_features, out_features = (int(n) for n in shape.split("x"))
                tile = x86.DenseTile(int(entry["rows"]), int(entry["vectors"]), int(entry["lanes"]))
                if min(tile.rows, tile.vectors, tile.lanes, entry["panels_per_task"]) >= 1:
                    choice = DenseChoice(tile, int(entry["panels_per_task"]), float(entry["us"]))
                    dense[rows, in_features, out_features] = choice
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.warning("fxopt: warning: %s is not a template database (%s); using default schedules", file, exc)
            return cls()
        return cls(dense)

    def save(self, database_dir: Path) -> None:
        entries = {
            f"{rows}x{in_features}x{out_features}": {
                "rows": c.tile.rows,
                "vectors": c.tile.vectors,
                "lanes": c.tile.lanes,
                "panels_per_task": c.panels_per_task,
                "us": c.us,
            }
            for (rows, in_features, out_features), c in sorted(self.dense.items())
        }
        temporary = Path(database_dir) / f"{TEMPLATES_FILE}.tmp"
        temporary.write_text(json.dumps({"dense_f32": entries}, indent=1) + "\n")
        temporary.replace(Path(database_dir) / TEMPLATES_FILE)  # whole or not at all, should the process die


def dense_candidates(in_features: int, isa: Isa) -> list[DenseChoice]:
    """The schedules tuning times for a GEMM with ``in_features`` on ``isa``: every tile of its candidates
    (:data:`fxopt.codegen.x86.DENSE_TILES`) with 1 to 3 weight panels per task, as many as fit in a core's L2."""
    tiles = x86.DENSE_TILES[x86.dense_tile(isa).lanes]
    return [
        DenseChoice(tile, panels)
        for tile in tiles
        for panels in (1, 2, 3)
        if panels == 1 or panels * in_features * tile.panel * 4 <= isa.l2_bytes
    ]


def template_shapes(mod) -> list[tuple[int, int, int]]:
    """The GEMM shapes of module ``mod``'s template kernels, largest first."""
    from tvm import tirx

    shapes = set()
    for _, func in mod.functions_items():
        name = func.attrs.get(x86.TEMPLATE_ATTR) if isinstance(func, tirx.PrimFunc) and func.attrs else None
        if name is not None and str(name).startswith("dense_f32 "):
            rows, in_features, out_features = (int(n) for n in str(name).split()[1].split("x"))
            shapes.add((rows, in_features, out_features))
    return sorted(shapes, key=lambda s: -s[0] * s[1] * s[2])
