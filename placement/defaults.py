"""Finding rules: a path or the name of a shipped file in rules/, and the default when none is given."""

from __future__ import annotations

from pathlib import Path

from runtime.config import ModelConfig

from .inventory import Inventory
from .schema import AUTO, RuleSet, load_rules
from .tune import tune
from .yaml_lines import RulesError

RULES_DIR = Path(__file__).resolve().parents[1] / "rules"


def shipped() -> list[str]:
    return sorted(p.stem for p in RULES_DIR.glob("*.yaml"))


def resolve(name: str | Path) -> Path:
    """A rules file path, or the name of a shipped one (`deepseek-v3-1gpu`)."""
    path = Path(name)
    if path.is_file():
        return path
    candidate = RULES_DIR / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    raise RulesError(f"{name}: no such rules file, and no shipped rules of that name (shipped: {', '.join(shipped())})")


def open_rules(name: str | Path, inventory: Inventory) -> RuleSet:
    return load_rules(resolve(name), inventory)


def default_rules(cfg: ModelConfig, inventory: Inventory, *, ctx: int = 4096, expert_quant: str = AUTO) -> RuleSet:
    """What hmoe uses when no rules are given: the tuner's answer for this model on this machine,
    from the ops the runtime runs today (CPU-only without a GPU; otherwise as much on cuda:0 as
    fits, in decode order)."""
    return tune(cfg, inventory, ctx=ctx, expert_quant=expert_quant, source="<default rules for this machine>",
                runnable_only=True).rules
