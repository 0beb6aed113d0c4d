"""The report's "Does it hold?" section, from the record's `robustness` entries (`safeedit.robustness`): the
attack budget, one table row per result, and a plain-words reading of how each method's forgetting held against
the reference's (which relearns too) and the original's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Within this many points of the reference, a method "holds as well as the reference" (the relearning curves of
# two references trained with different seeds differ by a few points on the embedded data).
TOLERANCE = 0.05
# The result each kind's curves are read against: a model retrained without the forget data, or, for merges, the
# frozen encoder (a shared body that never had the backdoor: the pretrained one, with each task's own head).
REFERENCES = ("retrain", "frozen_encoder")


@dataclass
class RobustnessView:
    """What the template shows: the budget in words, the table's columns and rows, the reading, the attacks."""

    attacked: bool
    budget: str = ""
    primary: str = ""
    columns: list[tuple[str, str]] = field(default_factory=list)  # (record metric, column heading)
    rows: list[tuple[str, list[Any]]] = field(default_factory=list)
    reading: list[str] = field(default_factory=list)
    attacks: list[str] = field(default_factory=list)
    relearn_sets: list[str] = field(default_factory=list)


def robustness_view(results: dict[str, Any], label: Any, fmt: Any) -> RobustnessView:
    """`label(metric)` is the metric's plain name (`record.plain_label`), `fmt(metric, value)` its text."""
    attacked = {name: r["robustness"] for name, r in results.items() if r.get("robustness")}
    if not attacked:
        return RobustnessView(attacked=False)
    first = next(iter(attacked.values()))
    budget, primary = first["budget"], first["budget"]["primary"]
    relearn = {s: data for s, data in first["relearning"].items()}
    steps = budget["relearn_steps"]
    words = [f"{data['about']}" for data in relearn.values()]
    text = (f"Every result was attacked the same way (seed {budget['seed']}): AdamW at learning rate {budget['lr']:g}, "
            f"weight decay 0, for {', '.join(map(str, steps))} steps on " + "; separately on ".join(words) +
            f"; and weight-only rounding ({', '.join(first['quantization']) or 'none'}). {budget.get('about', '')}")
    columns = [(_relearn(s, primary, k), f"{'relearn' if s == 'forget' else s} @{k}") for s in relearn for k in steps]
    columns += [(f"{primary}_{scheme}", scheme) for scheme in first["quantization"]]
    columns += [(f"edit_below_half_step_{scheme}", f"edit < ½ step {scheme}") for scheme in first["quantization"]]
    attack_metrics = sorted({m for r in attacked.values() for a in r["attacks"].values() for m in a.get("metrics", {})})
    columns += [(m, label(m)) for m in attack_metrics]
    rows = [(name, [results[name]["metrics"]["after"].get(m) for m, _ in columns]) for name in attacked]
    attacks = sorted({f"{name}: {a['about']}" for r in attacked.values() for name, a in r["attacks"].items()
                      if a.get("about")})
    reading = _reading(attacked, primary, budget["forgotten"], label, fmt)
    return RobustnessView(True, text, primary, columns, rows, reading, attacks, list(relearn))


def _relearn(relearn_set: str, metric: str, steps: int) -> str:
    return f"relearn_{metric}@{steps}" if relearn_set == "forget" else f"relearn_{relearn_set}_{metric}@{steps}"


def _reading(attacked: dict[str, Any], primary: str, forgotten: str, label: Any, fmt: Any) -> list[str]:
    """One sentence per attack: where the reference ends, which methods hold as well, which lose their forgetting."""
    sign = 1.0 if forgotten == "high" else -1.0
    name = label(primary)
    lines = []

    def _pct(value: float | None, metric: str = primary) -> str:
        return fmt(metric, value)

    reference_name = next((n for n in REFERENCES if n in attacked), None)
    reference = attacked.get(reference_name)
    methods = {n: r for n, r in attacked.items() if n not in ("original", reference_name)}
    for relearn_set, data in next(iter(attacked.values()))["relearning"].items():
        steps = data["steps"]

        def curve(entry: dict[str, Any], relearn_set: str = relearn_set) -> list[float] | None:
            return entry["relearning"].get(relearn_set, {}).get("metrics", {}).get(primary) or None

        parts = [f"Relearning on {data['about']} ({', '.join(map(str, steps))} steps):"]
        base = curve(reference) if reference else None
        if base:
            parts.append(f"the reference ({reference_name}) goes {' → '.join(_pct(v) for v in base)} {name};")
            held, weaker = [], []
            for n, r in methods.items():
                values = curve(r)
                if not values:
                    continue
                # the step (after 0) where the method's forgetting falls furthest below the reference's
                gaps = [(sign * (v - b), k, v, b) for k, v, b in zip(steps, values, base, strict=True) if k > 0]
                shortfall = min(gaps, default=None)
                if shortfall is None or shortfall[0] >= -TOLERANCE:
                    held.append(n)
                else:
                    weaker.append(f"{n} ({_pct(shortfall[2])} after {shortfall[1]} steps against the reference's "
                                  f"{_pct(shortfall[3])})")
            if held:
                parts.append(f"{', '.join(held)} hold{'s' if len(held) == 1 else ''} as well at every step (within "
                             f"{100 * TOLERANCE:.0f} points or better);")
            if weaker:
                parts.append("forgetting lost faster than the reference's: " + "; ".join(weaker) + ".")
        else:
            parts.append("; ".join(f"{n} {' → '.join(_pct(v) for v in values)}" for n, r in methods.items()
                                   if (values := curve(r))) + f" ({name}; no reference to compare with).")
        lines.append(" ".join(parts))
    for scheme in next(iter(attacked.values()))["quantization"]:
        moved = []
        for n, r in methods.items():
            before = r["relearning"].get("forget", {}).get("metrics", {}).get(primary, [None])[0]
            after = r["quantization"][scheme]["metrics"].get(primary)
            below = r["quantization"][scheme].get("revival", {}).get("share_below_half_step")
            if before is not None and after is not None and sign * (after - before) < -TOLERANCE:
                why = "" if below is None else f"; {fmt('share', below)} of its edited weights moved < ½ step"
                moved.append(f"{n} ({_pct(before)} → {_pct(after)}{why})")
        lines.append(f"Rounding to {scheme}: " + (f"forgetting weakened by more than {100 * TOLERANCE:.0f} points for "
                                                  + "; ".join(moved) + "." if moved else
                                                  f"no method's {name} moved back by more than {100 * TOLERANCE:.0f} "
                                                  "points."))
    return lines
