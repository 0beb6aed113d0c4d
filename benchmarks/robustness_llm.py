"""Does LLM forgetting hold? The robustness battery (issue 20: relearning, int8/int4 rounding, prompt probes) on
rows of the WAGLE benchmark setting: the original, the retrained reference, dense NPO, NPO + WAGLE and NPO on a
random mask of the same size, every row attacked with the same budget.

    .venv/bin/python benchmarks/robustness_llm.py --protocol authors    # split 1, seeds 1-3 (resumable)
    .venv/bin/python benchmarks/robustness_llm.py --protocol capitals   # forget sets 1-3
    .venv/bin/python benchmarks/robustness_llm.py --summary             # results/robustness-llm.txt

Setting (as benchmarks/wagle.py, whose cached fine-tunes it reuses): SmolLM2-135M-Instruct fine-tuned on 20
fictitious authors × 10 questions; report split 1 (two authors, 20 forget questions); the reference is the
fine-tune on split 1's retain authors with seed 1. Unlearning: 3 epochs, batch 4 + 4 retain, mask ratio 0.2, at
the rate of wagle.py's table A (3e-5 for every row, set before any measurement); capitals: NPO at 3e-6 (chosen by
wagle.py on forget set 0), forget sets 1-3. Nothing is chosen on the reported splits.

The attack (the same for every row, fixed before any measurement, not tuned): the attacker holds 25% of the forget
pairs; AdamW (weight decay 0) at 2e-5, batch 4, 0/10/50 steps on them and, separately, on as many retain pairs
(never forgotten); int8 (per channel) and int4 (groups of 128) round-to-nearest; the prompt probes of
`safeedit.robustness.language`. Forgetting is measured on the forget pairs the attacker does not hold. The battery
seed is the unlearning seed (which pairs the attacker holds, the batch order), so within a seed every row is
attacked on the same pairs. Every row is saved as measured (`--state`) and skipped when rerun.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from safeedit.data.authors import fictitious_authors, retain_subset
from safeedit.data.capitals import CAPITAL_ANSWER_TOKENS, capital_facts, capitals_setting, known_capitals
from safeedit.models.cache import cached_finetune
from safeedit.models.language import SMOLLM2, load_language_model
from safeedit.models.lm_training import FinetuneOptions
from safeedit.robustness import RobustnessOptions, attack
from safeedit.robustness.language import LanguageData, language_surface
from safeedit.robustness.language_names import PROBES
from safeedit.robustness.quantize import quantized_layers
from safeedit.scenario import CapitalsSection
from safeedit.unlearn.wagle import LMUnlearnOptions, lm_unlearn

RESULTS = Path(__file__).parent / "results"
FINETUNE = FinetuneOptions(lora_rank=0, epochs=5, lr=1e-4, batch_size=8)  # wagle.py's: its caches are reused
METHODS = ("npo", "npo+wagle", "npo+random")
LRS = {"authors": 3e-5, "capitals": 3e-6}
PRIMARY = {"authors": "probability_forget", "capitals": "forget_accuracy"}
UTILITY = {"authors": "probability_retain", "capitals": "probability_retain"}


class State:
    """Rows keyed by (protocol, split, row, seed), saved after every addition."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"rows": [], "meta": {}}

    def get(self, protocol: str, split: int, row: str, seed: int) -> dict | None:
        return next((r for r in self.data["rows"] if (r["protocol"], r["split"], r["row"], r["seed"])
                     == (protocol, split, row, seed)), None)

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.data, indent=1))
        temporary.replace(self.path)
        print(f"{row['protocol']} split {row['split']} seed {row['seed']} {row['row']}: "
              f"{row['wall_s']:.0f} s", flush=True)


def compact(entry: dict[str, Any]) -> dict[str, Any]:
    """The record entry without the per-layer revival lists (hundreds of rows per scheme)."""
    quantization = {name: {**item, "revival": {k: v for k, v in item["revival"].items() if k != "layers"}}
                    if "revival" in item else item for name, item in entry["quantization"].items()}
    return {**entry, "quantization": quantization}


@torch.no_grad()
def edit_spread(original: torch.nn.Module, edited: torch.nn.Module) -> dict[str, float]:
    """Where the edit lies: weights changed, and the share of its squared L2 norm in the layers int8/int4 round
    (the rest, embeddings tied to the output head and norms, stays in full precision under weight-only schemes)."""
    rounded = set(quantized_layers(edited))
    before = dict(original.named_parameters())
    changed, inside, total = 0, 0.0, 0.0
    for name, after in edited.named_parameters():
        delta = (after.detach().double() - before[name].detach().double())
        changed += int(torch.count_nonzero(delta))
        energy = float((delta ** 2).sum())
        total += energy
        inside += energy if name in rounded else 0.0
    return {"changed": changed, "share_in_rounded_layers": inside / total if total else 0.0}


def run(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    state = State(args.state)
    loaded = load_language_model(SMOLLM2)
    base, tokenizer = loaded.model, loaded.tokenizer
    options = RobustnessOptions(relearn_steps=args.relearn_steps, lr=args.attack_lr, batch_size=args.attack_batch,
                                forget_share=args.forget_share)
    state.data["meta"][args.protocol] = {"options": options.model_dump(), "lr": LRS[args.protocol],
                                         "epochs": args.epochs, "seeds": args.seeds, "torch": torch.__version__,
                                         "threads": args.threads}
    unlearning = LMUnlearnOptions(epochs=args.epochs, ratio=0.2, batch_size=4, lr=LRS[args.protocol])

    def out_of_time() -> bool:
        return bool(args.deadline) and time.perf_counter() - started > args.deadline * 60

    def attacked(split: int, seed: int, row: str, model_of, surface, original) -> None:
        if state.get(args.protocol, split, row, seed) is not None or out_of_time():
            return
        start = time.perf_counter()
        model = model_of()
        unlearn_s = time.perf_counter() - start
        spread = edit_spread(original, model) if model is not original and row != "retrain" else None
        flat, entry = attack(surface, row, model, original if model is not original else None, options, seed)
        state.add({"protocol": args.protocol, "split": split, "row": row, "seed": seed, "metrics": flat,
                   "robustness": compact(entry), "edit": spread, "unlearn_s": unlearn_s,
                   "wall_s": time.perf_counter() - start})

    if args.protocol == "authors":
        data = fictitious_authors(20, 10, 2, 0.1, 3, 0, args.split)
        original, _ = cached_finetune(base, tokenizer, [q.chat() for q in data.train()], FINETUNE, 0,
                                      "authors-all", loaded.weights_sha256, True)
        reference, _ = cached_finetune(base, tokenizer, [q.chat() for q in data.retain], FINETUNE, 1,
                                       "authors-retain", loaded.weights_sha256, True)
        evaluated = retain_subset(data.retain, args.retain_questions, 0)
        forget, retain = [q.chat() for q in data.forget], [q.chat() for q in data.retain]
        for seed in args.seeds:
            surface = language_surface(LanguageData.authors(data.forget, data.retain, evaluated), tokenizer,
                                       options, seed, args.max_new_tokens, 16, 160, reference)
            rows = {"original": lambda o=original: o, "retrain": lambda r=reference: r}
            for method in args.methods:
                rows[method] = lambda m=method, o=original, f=forget, r=retain, s=seed: lm_unlearn(
                    o, tokenizer, f, r, m, unlearning, s, progress=False)[0]
            for row, model_of in rows.items():
                attacked(args.split, seed, row, model_of, surface, original)
    else:
        known = known_capitals(base, tokenizer, capital_facts(), CAPITAL_ANSWER_TOKENS, 16)
        for split in args.seeds:  # a forget set per seed, as wagle.py
            setting = capitals_setting(known, CapitalsSection(protocol="capitals", forget=10, seed=split,
                                                              fluency_texts=40), args.retain_questions, 0)
            surface = language_surface(LanguageData.capitals(setting.forget, setting.retain,
                                                             setting.evaluated_retain),
                                       tokenizer, options, split, CAPITAL_ANSWER_TOKENS, 16, 160)
            forget = [f.qa().chat() for f in setting.forget]
            retain = [f.qa().chat() for f in setting.retain]
            rows = {"original": lambda: base}
            for method in args.methods:
                rows[method] = lambda m=method, f=forget, r=retain, s=split: lm_unlearn(
                    base, tokenizer, f, r, m, unlearning, s, progress=False)[0]
            for row, model_of in rows.items():
                attacked(split, split, row, model_of, surface, base)
    print(f"done in {time.perf_counter() - started:.0f} s" + (" (deadline: rerun to resume)" if out_of_time()
                                                                else ""), flush=True)


# --- summary --------------------------------------------------------------------------------------------------


def _mean(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f}±{statistics.stdev(values):.3f}"


def protocol_table(rows: list[dict], protocol: str, meta: dict) -> list[str]:
    """Per row (mean ± sd over seeds): the relearning curves, int8/int4 and the probes; then the ranking."""
    primary, utility = PRIMARY[protocol], UTILITY[protocol]
    options = meta.get("options", {})
    steps = options.get("relearn_steps", [0, 10, 50])
    last = max(steps)
    mine = [r for r in rows if r["protocol"] == protocol]
    names = {r["row"] for r in mine}
    # a seed counts only once every row has it (a run stopped by --deadline leaves the last seed part-measured)
    seeds = sorted(seed for seed in {r["seed"] for r in mine} if {r["row"] for r in mine if r["seed"] == seed} == names)
    partial = sorted({r["seed"] for r in mine} - set(seeds))
    by_row: dict[str, list[dict]] = {}
    for r in mine:
        if r["seed"] in seeds:
            by_row.setdefault(r["row"], []).append(r)
    order = [name for name in ("original", "retrain", *METHODS) if name in by_row]
    order += sorted(set(by_row) - set(order))
    columns = [("edited" if k == 0 else f"relearn {k}", f"relearn_{primary}@{k}") for k in steps]
    columns += [(f"related {last}", f"relearn_related_{primary}@{last}"), ("int8", f"{primary}_int8"),
                ("int4", f"{primary}_int4"), ("util", f"relearn_{utility}@0"),
                (f"util r{last}", f"relearn_{utility}@{last}"), ("util int4", f"{utility}_int4")]
    edits = [("<½ step", "share_below_half_step"), ("L2 rounded", "share_in_rounded_layers")]
    probes = [(probe, next((m for m in (f"forget_accuracy_{probe}", f"probability_forget_{probe}")
                            if any(m in r["metrics"] for r in rows)), f"forget_accuracy_{probe}"))
              for probe in PROBES]
    left_out = f" (seeds {partial} not measured for every row: left out)" if partial else ""
    lines = [f"{protocol}: {primary} (low = forgotten) measured on the forget pairs the attacker does not hold; "
             f"seeds {seeds}{left_out}; attack: {options.get('forget_share', 0):.0%} of the forget pairs, AdamW lr "
             f"{options.get('lr')}, batch {options.get('batch_size')}; unlearning lr {meta.get('lr')}, "
             f"{meta.get('epochs')} epochs",
             f"util = {utility}; <½ step: share of the edited weights of the int4 layers that moved less than half "
             "a step of their group; L2 rounded: share of the edit's squared norm in the layers int8/int4 round "
             "(embeddings, tied to the output head, and norms stay in full precision)",
             f"{'row':12s}" + "".join(f"{label:>13s}" for label, _ in columns + edits)]
    for name in order:
        edited = [_mean([value for r in by_row[name] if (value := edit_figure(r, key)) is not None])
                  for _, key in edits]
        lines.append(_line(name, _cells(by_row[name], columns) + edited))
    lines += ["", "probes (forget accuracy: share of greedy answers naming the fact; mc: true option most likely):",
              f"{'row':12s}" + "".join(f"{label:>13s}" for label, _ in probes)]
    lines += [_line(name, _cells(by_row[name], probes)) for name in order]
    quality = [(("edited" if k == 0 else f"relearn {k}"), f"relearn_forget_quality@{k}") for k in steps]
    quality += [(f"related {last}", f"relearn_related_forget_quality@{last}"), ("int8", "forget_quality_int8"),
                ("int4", "forget_quality_int4")]
    if any(key in r["metrics"] for entries in by_row.values() for r in entries for _, key in quality):
        lines += ["", "forget quality against the reference (TOFU's KS-test p-value of the forget truth ratios; high = "
                  "indistinguishable from the model never trained on them):",
                  f"{'row':12s}" + "".join(f"{label:>13s}" for label, _ in quality)]
        lines += [_line(name, _cells(by_row[name], quality)) for name in order]
    lines += ["", *ranking(by_row, primary, last)]
    return lines


def _cells(entries: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    """Each column's metric as mean ± sd over the row's seeds."""
    return [_mean([r["metrics"][key] for r in entries if key in r["metrics"]]) for _, key in columns]


def _line(name: str, cells: list[str]) -> str:
    return f"{name:12s}" + "".join(f"{cell:>13s}" for cell in cells)


def edit_figure(row: dict, key: str) -> float | None:
    """An edit-location figure of a row: int4 revival shares (battery entry) or the L2 share (`edit_spread`). The
    reference is trained anew, not an edit of the original: it has none (as in the scenarios' reports)."""
    if row["row"] == "retrain":
        return None
    if key == "share_in_rounded_layers":
        return (row.get("edit") or {}).get(key)
    return row["robustness"]["quantization"].get("int4", {}).get("revival", {}).get(key)


def ranking(by_row: dict[str, list[dict]], primary: str, last: int) -> list[str]:
    """Rows ranked by the primary metric after each attack (low = still forgotten: holds better; a row that forgot
    less to begin with does not win by rising less), with its rise over the edited model's own value; the original
    and the reference rows are the baselines."""
    def after(entries: list[dict], key: str) -> tuple[float, float] | None:
        rows = [r["metrics"] for r in entries if key in r["metrics"]]
        if not rows:
            return None
        return (statistics.mean(m[key] for m in rows),
                statistics.mean(m[key] - m[f"relearn_{primary}@0"] for m in rows))

    lines = []
    for label, key in ((f"{last} relearning steps on forget pairs", f"relearn_{primary}@{last}"),
                       (f"{last} relearning steps on retain pairs", f"relearn_related_{primary}@{last}"),
                       ("int4 rounding", f"{primary}_int4")):
        found = {name: after(entries, key) for name, entries in by_row.items()}
        ranked = sorted((value, name) for name, value in found.items() if value is not None)
        lines.append(f"{primary} after {label} (lower holds better; rise over the edit): "
                     + ", ".join(f"{name} {level:.3f} ({rise:+.3f})" for (level, rise), name in ranked))
    return lines


def summary(path: Path) -> str:
    data = json.loads(path.read_text())
    lines = ["LLM unlearning robustness (benchmarks/robustness_llm.py)"]
    for protocol in ("authors", "capitals"):
        if any(r["protocol"] == protocol for r in data["rows"]):
            lines += ["", *protocol_table(data["rows"], protocol, data["meta"].get(protocol, {}))]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summary", action="store_true", help="print the tables of --state and write the .txt")
    parser.add_argument("--state", type=Path, default=RESULTS / "robustness-llm.json")
    parser.add_argument("--protocol", choices=("authors", "capitals"), default="authors")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--split", type=int, default=1, help="authors: the reported split")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                        help="unlearning and battery seeds (capitals: also the forget sets)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--retain-questions", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--relearn-steps", type=int, nargs="+", default=[0, 10, 50])
    parser.add_argument("--attack-lr", type=float, default=2e-5)
    parser.add_argument("--attack-batch", type=int, default=4)
    parser.add_argument("--forget-share", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--deadline", type=float, default=None, help="minutes; stop after the row under way")
    args = parser.parse_args()
    if not args.summary:
        run(args)
        return
    text = summary(args.state)
    print(text)
    args.state.with_suffix(".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
