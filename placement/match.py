"""Which rule places each module: the first rule whose `match` fully matches the module's name and
whose `layers` (if any) contain its layer. Modules no rule matches fall to `defaults`."""

from __future__ import annotations

from .modules import Unit
from .schema import Rule, RuleSet


def first_match(rules: RuleSet, unit: Unit) -> Rule | None:
    for rule in rules.rules:
        if rule.matches(unit.name, unit.layer):
            return rule
    return None


def assign(rules: RuleSet, units: tuple[Unit, ...]) -> list[tuple[Unit, Rule | None]]:
    return [(unit, first_match(rules, unit)) for unit in units]


def unused_rule_warnings(rules: RuleSet, units: tuple[Unit, ...], assigned: list[tuple[Unit, Rule | None]],
                         num_layers: int) -> list[str]:
    """A rule that places nothing is almost always a typo; say why it places nothing."""
    placed = {rule.index for _, rule in assigned if rule is not None}
    warnings = []
    for rule in rules.rules:
        where = f"{rules.source}:{rule.line}: rule {rule.index} (match '{rule.match}'" + \
                (f", layers {rule.layers_text})" if rule.layers is not None else ")")
        if rule.layers is not None and max(rule.layers) >= num_layers:
            warnings.append(f"{where} names layers up to {max(rule.layers)}, but the model has layers "
                            f"0-{num_layers - 1}")
        if rule.index in placed:
            continue
        hits = [u for u in units if rule.matches(u.name, u.layer)]
        if hits:
            winner = next(r for u, r in assigned if u is hits[0])
            warnings.append(f"{where} places nothing: every module it matches is placed by an earlier rule "
                            f"(first {hits[0].name}, by {winner.label})")
            continue
        partial = [u for u in units if rule.pattern.match(u.name) and (rule.layers is None or u.layer in rule.layers)]
        hint = (f"; 'match' must match the whole name, and only matches the start of {partial[0].name}"
                if partial else "")
        warnings.append(f"{where} matches no module of this model{hint}")
    return warnings
