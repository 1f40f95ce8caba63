"""Tuned configs of fxopt's kernel families (:mod:`fxopt.codegen.kernels`) per workload.

A family's analytic default from the target's :class:`~fxopt.codegen.isa.Isa` is best on BERT-base's shapes here,
but not on every shape (measured on a 2-core Zen 3: MiniLM's 192x384x384 GEMM 1.10-1.14x with 6x2 tiles,
decoding's 1x768x3072 1.05x with 2x6). Tuning (:func:`fxopt.codegen.tune.tune`) times every config of each
family's space for each workload the model has and stores the fastest in ``templates.json`` in the target's
tuning database directory. Lowering reads it (:class:`TemplateChoices`): tuned workloads get their choice unless
it is not in the space for this ISA (a database copied from another machine), the others the default. A file
that is not what this module wrote is ignored with a warning, and families it names that this version does not
know are skipped: a build never fails because of the cache.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fxopt.codegen.isa import Isa
from fxopt.codegen.kernels import FAMILIES
from fxopt.codegen.kernels.base import KernelFamily, Workload, parse_workload_key, workload_key
from fxopt.codegen.tuning_database import TEMPLATES_FILE

__all__ = ["Choice", "TemplateChoices"]

logger = logging.getLogger("fxopt.codegen.tune")


@dataclass(frozen=True)
class Choice:
    """A tuned config and its measured time."""

    config: Any
    us: float


@dataclass
class TemplateChoices:
    """Tuned configs by family name and workload; a workload not in it gets its family's default."""

    chosen: dict[tuple[str, Workload], Choice] = field(default_factory=dict)

    def config(self, family: KernelFamily, workload: Workload, isa: Isa) -> Any:
        """The config to build ``family``'s kernel for ``workload`` on ``isa`` with."""
        tuned = self.chosen.get((family.name, workload))
        if tuned is not None and tuned.config in family.space(workload, isa):
            return tuned.config
        return family.default(workload, isa)

    @classmethod
    def load(cls, database_dir: Path | None) -> TemplateChoices:
        """The choices stored in ``database_dir`` (none when it is ``None`` or holds no file)."""
        file = Path(database_dir) / TEMPLATES_FILE if database_dir is not None else None
        if file is None or not file.exists():
            return cls()
        chosen = {}
        try:
            for name, entries in json.loads(file.read_text()).items():
                if name not in FAMILIES:
                    continue
                family = FAMILIES[name]
                for key, entry in entries.items():
                    chosen[name, parse_workload_key(key)] = Choice(family.config_from(entry), float(entry["us"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.warning("fxopt: warning: %s is not a template database (%s); using default schedules", file, exc)
            return cls()
        return cls(chosen)

    def save(self, database_dir: Path) -> None:
        entries: dict[str, dict] = {}
        for (name, workload), choice in sorted(self.chosen.items()):
            entry = {**FAMILIES[name].config_entry(choice.config), "us": choice.us}
            entries.setdefault(name, {})[workload_key(workload)] = entry
        temporary = Path(database_dir) / f"{TEMPLATES_FILE}.tmp"
        temporary.write_text(json.dumps(entries, indent=1) + "\n")
        temporary.replace(Path(database_dir) / TEMPLATES_FILE)  # whole or not at all, should the process die
