"""WAGLE benchmark: {GradDiff, NPO, refusal} × {no mask, random, magnitude, saliency, WAGLE} on fictitious authors
(forget 10%), against the original and the retrained reference; and the real-knowledge (capitals) protocol.

    # two processes of one thread each share the rows (2 CPU cores; ~3 h the first time; resumable):
    for w in 0 1; do .venv/bin/python benchmarks/wagle.py --workers 2 --worker $w --protocols authors \
        --lrs 3e-5 1e-4 & done; wait
    for w in 0 1; do .venv/bin/python benchmarks/wagle.py --workers 2 --worker $w --protocols capitals \
        --objectives npo --masks "" random wagle --lrs 3e-6 1e-5 & done; wait
    .venv/bin/python benchmarks/wagle.py --summary   # print the tables of benchmarks/results/wagle-*w*.json, plot

Setting (as scenarios/tofu-forget10.yaml, whose cached fine-tunes it reuses): SmolLM2-135M-Instruct fine-tuned on
20 fictitious authors × 10 questions (people seed 0; the training set, hence the model, is the same for every
split). Split 0 (the scenario's forget set) is for tuning only; split 1 (two other authors) is reported, with
unlearning seeds 1-3 (batch order, retain pairing, random masks). The reference is the fine-tune on split 1's
retain authors with seed 1; the same fine-tune with seed 2 gives the retrain-vs-retrain noise floor.

Tuning, the same for every row: the learning rate from `--lrs` (2 values) on split 0 against its own reference,
all else fixed (3 epochs, batch 4 + 4 paired retain, mask ratio 0.2, γ = 1, retain weight 1, β = 0.1). Rule: the
highest forget quality among the rates that keep model utility ≥ 95% of the original's; if none does, the one with
the highest utility. Capitals: objectives × {no mask, random, WAGLE}; the rate is chosen on forget set 0 by the
lowest forget accuracy with retain drop ≤ 5 points and perplexity increase ≤ 10% (else the smallest retain drop),
then forget sets 1-3 are reported. The summary's table A is the no-search run (`--no-tune --lrs 3e-5`: every
row at the scenario's rate, set before any measurement), table B the equal-search one.

The CPU budget (2 cores) sets the sizes: 20 retain questions evaluated, 32-token answers, 2 learning rates, one
report split. Every row is saved as it is measured (`benchmarks/results/wagle-w<worker>.json`) and skipped when
rerun, so the run can be stopped (`--deadline` minutes) and resumed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import ks_2samp

from safeedit.data.authors import fictitious_authors, retain_subset
from safeedit.data.capitals import CAPITAL_ANSWER_TOKENS, capital_facts, capitals_setting, known_capitals
from safeedit.eval.qa import authors_metrics, capitals_metrics
from safeedit.models.cache import cached_finetune
from safeedit.models.language import SMOLLM2, load_language_model
from safeedit.models.lm_training import FinetuneOptions
from safeedit.protocol import Candidate, Protocol, Rule, tune_then_report
from safeedit.scenario import CapitalsSection
from safeedit.unlearn.wagle import LMUnlearnOptions, lm_unlearn

RESULTS = Path(__file__).parent / "results" / "wagle.json"
OBJECTIVES = ("graddiff", "npo", "refusal", "simnpo", "rmu")  # simnpo, rmu: issue 19, not yet measured
MASKS = ("", "random", "magnitude", "saliency", "wagle")
CAPITAL_MASKS = ("", "random", "wagle")
UNTUNED_LR = 3e-5  # scenarios/tofu-forget10.yaml's rate, set before any measurement: the no-search table
SHORT = {"forget_quality": "fq", "truth_ratio_forget": "tr_f", "rouge_l_forget": "rl_f", "rouge_l_retain": "rl_r",
         "probability_retain": "p_r", "model_utility": "mu", "mia_auc": "auc", "forget_accuracy": "acc_f",
         "retain_accuracy": "acc_r", "perplexity": "ppl"}
FINETUNE = FinetuneOptions(lora_rank=0, epochs=5, lr=1e-4, batch_size=8)
EVAL_BATCH = 16  # answers generated at once when evaluating


def method_name(objective: str, mask: str) -> str:
    return f"{objective}+{mask}" if mask else objective


class State:
    """Rows keyed by (protocol, phase, split, method, lr, seed), saved after every addition."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"rows": [], "meta": {}}
        self.index = {self.key(r): r for r in self.data["rows"]}

    @staticmethod
    def key(row: dict) -> tuple:
        return row["protocol"], row["phase"], row["split"], row["method"], row.get("lr"), row.get("seed")

    def get(self, **key: Any) -> dict | None:
        return self.index.get(self.key(key))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.data, indent=1))
        temporary.replace(self.path)

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.index[self.key(row)] = row
        self.save()
        shown = {SHORT.get(k, k): (round(v, 4) if isinstance(v, float) and k != "lr" else v)
                 for k, v in row.items() if k not in ("ratios", "protocol", "probability_forget", "truth_ratio_retain")}
        print(json.dumps(shown, separators=(",", ":")), flush=True)


class OutOfTime(Exception):
    pass


# The tuning rules, as protocol Rules (the index of the chosen candidate; ties go to the first of the grid). The
# run and the summary both choose with them.

def _tuned(candidate: Candidate[dict]) -> dict:
    """A candidate's one row on the tune split."""
    (row,) = candidate.trials
    return row


def authors_rule(original_utility: float) -> Rule:
    """The highest forget quality (ties: utility) among the rates keeping utility >= 95% of the original's, else
    the highest utility."""
    def rule(candidates: list[Candidate[dict]]) -> int:
        rows = [_tuned(c) for c in candidates]
        keeping = [i for i, r in enumerate(rows) if r["model_utility"] >= 0.95 * original_utility]
        if keeping:
            return max(keeping, key=lambda i: (rows[i]["forget_quality"], rows[i]["model_utility"]))
        return max(range(len(rows)), key=lambda i: rows[i]["model_utility"])
    return rule


def capitals_rule(original: dict) -> Rule:
    """The lowest forget accuracy (ties: retain accuracy) among the rates with retain drop <= 5 points and
    perplexity increase <= 10%, else the highest retain accuracy."""
    def rule(candidates: list[Candidate[dict]]) -> int:
        rows = [_tuned(c) for c in candidates]
        keeping = [i for i, r in enumerate(rows) if r["retain_accuracy"] >= original["retain_accuracy"] - 0.05
                   and r["perplexity"] <= 1.1 * original["perplexity"]]
        if keeping:
            return min(keeping, key=lambda i: (rows[i]["forget_accuracy"], -rows[i]["retain_accuracy"]))
        return max(range(len(rows)), key=lambda i: rows[i]["retain_accuracy"])
    return rule


def chosen_lr(rows: list[dict], rule: Rule) -> float:
    """The rate `rule` picks among stored tuning rows (one candidate per row, in their order)."""
    return rows[rule([Candidate({"lr": r["lr"]}, [r]) for r in rows])]["lr"]


def lr_grid(args: argparse.Namespace) -> list[dict]:
    """Every method's configurations: the rates of --lrs, or with --no-tune the first alone (not tuned)."""
    return [{"lr": args.lrs[0]}] if args.no_tune else [{"lr": lr} for lr in args.lrs]


def run(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    state = State(args.state)

    def check_time() -> None:
        if args.deadline and time.perf_counter() - started > args.deadline * 60:
            raise OutOfTime

    def mine(items: list) -> list:
        return items[args.worker::args.workers]

    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = load_language_model(SMOLLM2)
    base, tokenizer = loaded.model.to(device), loaded.tokenizer
    state.data["meta"] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
                          f"cpu, {args.workers} processes × {args.threads} thread(s)",
                          "torch": torch.__version__, "finetune": args.finetune.model_dump(), "lrs": args.lrs,
                          "epochs": args.epochs, "mask_ratio": args.mask_ratio, "authors": args.authors,
                          "questions": args.questions, "retain_questions": args.retain_questions,
                          "max_new_tokens": args.max_new_tokens, "seeds": args.seeds, "tune_split": args.tune_split,
                          "report_split": args.report_split, "reference_seeds": args.reference_seeds,
                          "capitals_forget": args.capitals_forget}
    unlearn_options = LMUnlearnOptions(epochs=args.epochs, ratio=args.mask_ratio, batch_size=4)

    def timed_unlearn(model, forget: list, retain: list, method: str, lr: float, seed: int) -> tuple[Any, float]:
        """The unlearned copy of `model` at rate `lr`, and the seconds it took."""
        start = time.perf_counter()
        edited, _ = lm_unlearn(model, tokenizer, forget, retain, method,
                               unlearn_options.model_copy(update={"lr": lr}), seed, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return edited, time.perf_counter() - start

    if "authors" in args.protocols:
        splits = (args.tune_split, args.report_split)
        datasets = {s: fictitious_authors(args.authors, args.questions, 2, 0.1, 3, 0, s) for s in splits}
        train = [q.chat() for q in datasets[args.tune_split].train()]
        original, _ = cached_finetune(base, tokenizer, train, args.finetune, 0, "authors-all", loaded.weights_sha256,
                                      True)

        def evaluate(model, split, reference_ratios=None):
            data = datasets[split]
            eval_retain = retain_subset(data.retain, args.retain_questions, 0)
            return authors_metrics(model, tokenizer, data.forget, eval_retain, data.holdout, reference_ratios,
                                   args.max_new_tokens, EVAL_BATCH)

        def reference(split: int, seed: int):
            retain_chats = [q.chat() for q in datasets[split].retain]
            start = time.perf_counter()
            model, _ = cached_finetune(base, tokenizer, retain_chats, args.finetune, seed, "authors-retain",
                                       loaded.weights_sha256, True)
            return model, time.perf_counter() - start

        # References: the tuning split's (seed 0, the scenario's) and the report split's, shared out over workers.
        jobs = [(args.tune_split, 0), *((args.report_split, s) for s in args.reference_seeds)]
        for split, seed in mine(jobs):
            if state.get(protocol="authors", phase="ref", split=split, method=f"retrain_seed{seed}", seed=seed) is None:
                model, wall = reference(split, seed)
                result = evaluate(model, split)
                state.add({"protocol": "authors", "phase": "ref", "split": split, "method": f"retrain_seed{seed}",
                           "lr": None, "seed": seed, **result.metrics, "ratios": result.forget_ratios.tolist(),
                           "wall_s": wall})
                del model
        if args.worker == 0:
            for split in splits:
                if state.get(protocol="authors", phase="ref", split=split, method="original") is None:
                    result = evaluate(original, split)
                    state.add({"protocol": "authors", "phase": "ref", "split": split, "method": "original",
                               "lr": None, **result.metrics, "ratios": result.forget_ratios.tolist(), "wall_s": None})
        # Rows any worker has measured (a worker's share of methods depends on --methods and --workers).
        measured = {State.key(r): r for r in load_rows(sorted(args.results.glob("wagle-w[0-9]*.json")))[0]}
        rule: Rule = lambda candidates: 0  # noqa: E731 -- with --no-tune there is one configuration, nothing to choose
        if not args.no_tune:
            # The tuning split's reference ratios and the original's utility there, from any worker's state (a
            # restarted worker does not evaluate them again), else evaluated now.
            found = reference_rows(measured.values(), args.tune_split)
            if "retrain_seed0" in found and "original" in found:
                dev_ratios = np.array(found["retrain_seed0"]["ratios"])
                original_dev_utility = found["original"]["model_utility"]
            else:
                dev_model, _ = reference(args.tune_split, 0)
                dev_ratios = evaluate(dev_model, args.tune_split).forget_ratios
                del dev_model
                original_dev_utility = evaluate(original, args.tune_split).metrics["model_utility"]
            rule = authors_rule(original_dev_utility)

        def authors_run(split: int, method: str, lr: float, phase: str, seed: int) -> dict:
            key = {"protocol": "authors", "phase": phase, "split": split, "method": method, "lr": lr, "seed": seed}
            found = state.get(**key) or measured.get(State.key(key))  # or another worker measured it
            if found is not None:
                return found
            check_time()
            data = datasets[split]
            edited, wall = timed_unlearn(original, [q.chat() for q in data.forget], [q.chat() for q in data.retain],
                                         method, lr, seed)
            # Forget quality at run time only where a choice depends on it (tuning); the summary recomputes it
            # for every row from the stored truth ratios against the reference it names.
            result = evaluate(edited, split, dev_ratios if phase == "tune" else None)
            del edited
            row = {"protocol": "authors", "phase": phase, "split": split, "method": method, "lr": lr, "seed": seed,
                   **result.metrics, "ratios": result.forget_ratios.tolist(), "wall_s": wall}
            state.add(row)
            return row

        # A unit is (split, unlearning seed): tuned on the tune split with its own number as seed, reported on the
        # report split with each seed. The summary derives the same choice from the stored tuning rows.
        methods = mine(args.methods or [method_name(o, m) for o in args.objectives for m in MASKS if m in args.masks])
        tune_then_report({method: lr_grid(args) for method in methods},
                         Protocol(tune=((args.tune_split, args.tune_split),),
                                  report=tuple((args.report_split, seed) for seed in args.seeds)),
                         lambda method, config, unit, phase: authors_run(unit[0], method, config["lr"], phase, unit[1]),
                         rule)

    if "capitals" in args.protocols:
        facts = capital_facts()
        known = known_capitals(base, tokenizer, facts, CAPITAL_ANSWER_TOKENS, EVAL_BATCH)
        state.data["meta"]["capitals_known"] = len(known)
        state.data["meta"]["capitals_total"] = len(facts)
        state.data["meta"]["capitals_lrs"] = args.lrs

        splits = [args.tune_split, *args.seeds]
        settings = {s: capitals_setting(known, CapitalsSection(protocol="capitals", forget=args.capitals_forget,
                                                               seed=s, fluency_texts=40), args.retain_questions, 0)
                    for s in splits}
        originals = {}
        for split in splits:
            found = state.get(protocol="capitals", phase="ref", split=split, method="original")
            if found is None:
                setting = settings[split]
                metrics, _ = capitals_metrics(base, tokenizer, setting.forget, setting.evaluated_retain,
                                              setting.fluency, CAPITAL_ANSWER_TOKENS)
                found = {"protocol": "capitals", "phase": "ref", "split": split, "method": "original", "lr": None,
                         **metrics, "wall_s": None}
                if args.worker == 0:
                    state.add(found)
            originals[split] = found

        def capitals_run(split: int, method: str, lr: float, phase: str) -> dict:
            found = state.get(protocol="capitals", phase=phase, split=split, method=method, lr=lr, seed=split)
            if found is not None:
                return found
            check_time()
            setting = settings[split]
            edited, wall = timed_unlearn(base, [f.qa().chat() for f in setting.forget],
                                         [f.qa().chat() for f in setting.retain], method, lr, split)
            metrics, _ = capitals_metrics(edited, tokenizer, setting.forget, setting.evaluated_retain, setting.fluency,
                                          CAPITAL_ANSWER_TOKENS)
            del edited
            row = {"protocol": "capitals", "phase": phase, "split": split, "method": method, "lr": lr,
                   "seed": split, **metrics, "wall_s": wall}
            state.add(row)
            return row

        # A unit is a forget set (split, also the unlearning seed); the summary derives the same choice.
        methods = mine([method_name(o, m) for o in args.objectives for m in CAPITAL_MASKS if m in args.masks])
        tune_then_report({method: lr_grid(args) for method in methods},
                         Protocol(tune=(args.tune_split,), report=tuple(args.seeds)),
                         lambda method, config, split, phase: capitals_run(split, method, config["lr"], phase),
                         capitals_rule(originals[args.tune_split]))
    print(f"worker {args.worker}: done in {time.perf_counter() - started:.0f} s", flush=True)


# --- summary --------------------------------------------------------------------------------------------------

def load_rows(paths: list[Path]) -> tuple[list[dict], dict]:
    """Rows of every worker's state (duplicates dropped) and their merged metadata."""
    rows: dict[tuple, dict] = {}
    meta: dict[str, Any] = {}
    for path in paths:
        data = json.loads(path.read_text())
        for row in data["rows"]:
            rows.setdefault(State.key(row), row)
        for key, value in data["meta"].items():
            if isinstance(value, dict) and isinstance(meta.get(key), dict):
                meta[key] = {**meta[key], **value}
            else:
                meta.setdefault(key, value)
    return list(rows.values()), meta


def reference_rows(rows: Iterable[dict], split: int) -> dict[str, dict]:
    """The authors reference rows (original, retrain_seed<k>) of `split`, by method."""
    return {r["method"]: r for r in rows if r["protocol"] == "authors" and r["phase"] == "ref" and r["split"] == split}


def _stats(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


GAP_METRICS = ("truth_ratio_forget", "rouge_l_forget", "mia_auc")  # forget-side behaviour the reference shows
COLUMNS = ("forget_quality", "truth_ratio_forget", "rouge_l_forget", "rouge_l_retain", "model_utility", "mia_auc")


def authors_table(rows: list[dict], meta: dict, rates: dict[str, float]) -> tuple[list[str], dict[str, list[dict]]]:
    """Report-split rows per table row, each method at its rate in `rates`; forget quality recomputed against the
    first reference seed."""
    split = meta["report_split"]
    first, second = (f"retrain_seed{s}" for s in meta["reference_seeds"][:2])
    by = reference_rows(rows, split)
    reference = np.array(by[first]["ratios"])
    table: dict[str, list[dict]] = {}
    for name, label in (("original", "original"), (first, "retrain"), (second, "retrain (other seed)")):
        if name in by:
            table[label] = [by[name]]
    for objective in OBJECTIVES:
        for mask in MASKS:
            method = method_name(objective, mask)
            chosen = sorted((r for r in rows if r["protocol"] == "authors" and r["phase"] == "report"
                             and r["method"] == method and method in rates and np.isclose(r["lr"], rates[method])),
                            key=lambda r: r["seed"])
            if chosen:
                table[method] = chosen
    for entries in table.values():
        for r in entries:
            if r["method"] != first:
                r["forget_quality"] = float(ks_2samp(r["ratios"], reference).pvalue)
    for entries in table.values():
        for r in entries:
            r["gap_to_retrain"] = statistics.mean(abs(r[m] - by[first][m]) for m in GAP_METRICS)
    lines = [f"{'row':29s}{'lr':>7s}" + "".join(f"{c:>20s}" for c in COLUMNS)
             + f"{'FQ median':>11s}{'MU/orig':>9s}{'gap':>7s}{'wall s':>8s}"]
    original_utility = by["original"]["model_utility"]
    for label, entries in table.items():
        lr = rates.get(label)
        cells = "".join(f"{_stats([r[c] for r in entries]) if all(c in r for r in entries) else '-':>20s}"
                        for c in COLUMNS)
        fq = [r["forget_quality"] for r in entries if "forget_quality" in r]
        walls = [r["wall_s"] for r in entries if r.get("wall_s") is not None]
        share = statistics.mean(r["model_utility"] for r in entries) / original_utility
        if entries[0]["phase"] == "report" and len(entries) < len(meta["seeds"]):
            label = f"{label} ({len(entries)} seed{'s' * (len(entries) > 1)})"
        lines.append(f"{label:29s}{f'{lr:.0e}' if lr else '':>7s}{cells}"
                     f"{f'{statistics.median(fq):.3g}' if fq else '-':>11s}{share:>9.1%}"
                     f"{statistics.mean(r['gap_to_retrain'] for r in entries):>7.3f}"
                     f"{f'{statistics.median(walls):.0f}' if walls else '-':>8s}")
    return lines, table


def reported_methods(rows: list[dict]) -> list[str]:
    found = {r["method"] for r in rows if r["protocol"] == "authors" and r["phase"] == "report"}
    return [m for m in (method_name(o, k) for o in OBJECTIVES for k in MASKS) if m in found]


def untuned_rates(rows: list[dict]) -> dict[str, float]:
    """Table A: every reported method at the rate set before any measurement."""
    return {method: UNTUNED_LR for method in reported_methods(rows)}


def tuned_rates(rows: list[dict], meta: dict) -> dict[str, float]:
    """The rate the tuning rule picks for every reported method on the tuning split; empty unless every reported
    method has a tuning row at every rate of the search (a partial search is not an equal budget)."""
    tuning = [r for r in rows if r["protocol"] == "authors" and r["phase"] == "tune"]
    original = reference_rows(rows, meta["tune_split"]).get("original")
    rates: dict[str, float] = {}
    for method in reported_methods(rows):
        mine = [r for r in tuning if r["method"] == method]
        if original is None or len({r["lr"] for r in mine}) < len(meta["lrs"]) or len(meta["lrs"]) < 2:
            return {}
        rates[method] = chosen_lr(mine, authors_rule(original["model_utility"]))
    return rates


def tuning_table(rows: list[dict], meta: dict, rates: dict[str, float]) -> list[str]:
    """Split-0 search: forget quality (against split 0's own reference) and utility share per rate."""
    original = reference_rows(rows, meta["tune_split"])["original"]
    lrs = sorted(meta["lrs"])
    lines = [f"{'row':29s}" + "".join(f"{f'FQ @ {lr:.0e}':>14s}{f'MU @ {lr:.0e}':>14s}" for lr in lrs)
             + f"{'chosen':>9s}"]
    for method in rates:
        by_lr = {r["lr"]: r for r in rows if r["protocol"] == "authors" and r["phase"] == "tune"
                 and r["method"] == method}
        cells = "".join(f"{by_lr[lr]['forget_quality']:>14.3g}"
                        f"{by_lr[lr]['model_utility'] / original['model_utility']:>14.1%}" for lr in lrs)
        lines.append(f"{method:29s}{cells}{rates[method]:>9.0e}")
    return lines


def summary(paths: list[Path]) -> str:
    rows, meta = load_rows(paths)
    lines = [f"WAGLE benchmark ({meta.get('device', '?')}, torch {meta.get('torch', '?')})"]
    if any(r["protocol"] == "authors" and r["phase"] == "report" for r in rows):
        lines += ["", f"Fictitious authors: forget 10% ({meta['authors'] // 10} of {meta['authors']} authors, "
                      f"{meta['questions'] * meta['authors'] // 10} questions), report split {meta['report_split']}, "
                      f"unlearning seeds {meta['seeds']}: "
                      "mean ± sd over seeds. Forget quality = KS p-value against the reference fine-tuned with seed "
                      f"{meta['reference_seeds'][0]}; 'retrain (other seed)' is the reference fine-tuned with seed "
                      f"{meta['reference_seeds'][1]}: the retrain-vs-retrain noise floor.",
                  f"{meta['epochs']} epochs, batch 4 + 4 paired retain, mask ratio {meta['mask_ratio']}, γ = 1, "
                  f"retain questions evaluated {meta['retain_questions']}, greedy answers of "
                  f"{meta['max_new_tokens']} tokens; wall s = median unlearning time (masked rows include scoring); "
                  "gap = mean |Δ| to the reference over truth ratio, ROUGE-L and MIA AUC on the forget set."]
        table_lines, table = authors_table(rows, meta, untuned_rates(rows))
        lines += ["", f"A. No search: learning rate {UNTUNED_LR:g} for every row (the scenario's value, set before "
                      "any measurement)", *table_lines, *targets(table)]
        rates = tuned_rates(rows, meta)
        if rates:
            lines += ["", f"B. Equal search budget: learning rate in {sorted(meta['lrs'])} chosen per row on split "
                          f"{meta['tune_split']} (against split {meta['tune_split']}'s own reference; rule: highest "
                          "forget quality with utility >= 95% of the original's, else the highest utility)"]
            lines += tuning_table(rows, meta, rates)
            table_lines, table = authors_table(rows, meta, rates)
            lines += ["", f"Reported on split {meta['report_split']} at the chosen rates:", *table_lines,
                      *targets(table)]
    capitals = [r for r in rows if r["protocol"] == "capitals"]
    if capitals:
        lines += capitals_summary(capitals, meta)
    return "\n".join(lines)


def capitals_summary(capitals: list[dict], meta: dict) -> list[str]:
    """The tuning table of forget set `tune_split` and the report table at the rates the rule picks among those
    searched for every method (rates tried for some methods only are shown but not used)."""
    columns = ("forget_accuracy", "retain_accuracy", "perplexity")
    tuning = sorted((r for r in capitals if r["phase"] == "tune"), key=lambda r: (r["method"], r["lr"]))
    originals = {r["split"]: r for r in capitals if r["method"] == "original"}
    original = originals[meta["tune_split"]]
    methods = [m for m in (method_name(o, k) for o in OBJECTIVES for k in CAPITAL_MASKS)
               if any(r["method"] == m for r in tuning)]
    searched = set(meta.get("capitals_lrs", ()))
    rule = capitals_rule(original)
    rates = {m: chosen_lr([r for r in tuning if r["method"] == m and r["lr"] in searched], rule)
             for m in methods} if searched else {}
    lines = ["", f"Capitals, forget set {meta['tune_split']} (tuning; {meta.get('capitals_known')} of "
                 f"{meta.get('capitals_total')} capitals known, forget {meta.get('capitals_forget')}, retain accuracy "
                 f"on 20 others): original forget {original['forget_accuracy']:.2f}, retain "
                 f"{original['retain_accuracy']:.2f}, perplexity {original['perplexity']:.2f}; rates searched for "
                 f"every row: {sorted(searched)} (rule: lowest forget accuracy meeting the retain and perplexity "
                 "targets, else the highest retain accuracy); other rates were tried earlier for some rows only",
             f"{'row':22s}{'lr':>7s}" + "".join(f"{c:>20s}" for c in columns) + f"{'':>9s}"]
    lines += [f"{r['method']:22s}{r['lr']:>7.0e}" + "".join(f"{r[c]:>20.2f}" for c in columns)
              + f"{'chosen' if rates.get(r['method']) == r['lr'] else '':>9s}" for r in tuning]
    report_splits = sorted({r["split"] for r in capitals if r["phase"] == "report"})
    if not report_splits:
        return lines
    lines += ["", f"Capitals the base model knows ({meta.get('capitals_known')} of {meta.get('capitals_total')}):"
                  f" forget {meta.get('capitals_forget')}, forget sets (splits) {report_splits}, mean ± sd; "
                  f"learning rates chosen on split {meta['tune_split']}; perplexity on 40 held-out Wikipedia summaries",
              f"{'row':22s}{'lr':>7s}" + "".join(f"{c:>20s}" for c in columns) + f"{'targets met':>13s}"]
    for method in ["original", *methods]:
        chosen = [r for r in capitals if r["method"] == method and r["split"] in report_splits
                  and (r["phase"] == "ref" or (r["phase"] == "report" and np.isclose(r["lr"], rates.get(method, -1))))]
        if not chosen:
            continue
        met = sum(r["forget_accuracy"] <= 0.10
                  and r["retain_accuracy"] >= originals[r["split"]]["retain_accuracy"] - 0.05
                  and r["perplexity"] <= 1.10 * originals[r["split"]]["perplexity"] for r in chosen)
        lr = f"{rates[method]:.0e}" if method in rates else ""
        lines.append(f"{method:22s}{lr:>7s}" + "".join(f"{_stats([r[c] for r in chosen]):>20s}" for c in columns)
                     + (f"{met:>9d} of {len(chosen)}" if method != "original" else ""))
    lines.append("targets per forget set: forget accuracy ≤ 10%, retain accuracy drop ≤ 5 points, perplexity "
                 "increase ≤ 10%")
    return lines


def targets(table: dict[str, list[dict]]) -> list[str]:
    original = table["original"][0]

    def mean_of(method: str, metric: str) -> float:
        return statistics.mean(r[metric] for r in table[method])

    def share(method: str) -> float:
        return mean_of(method, "model_utility") / original["model_utility"]

    out = [""]
    if "npo+wagle" in table:
        fq = mean_of("npo+wagle", "forget_quality")
        out.append(f"target 1, WAGLE+NPO: forget quality {fq:.3g} (≥ 0.05: {'met' if fq >= 0.05 else 'missed'}), "
                   f"utility {share('npo+wagle'):.1%} of the original (≥ 95%: "
                   f"{'met' if share('npo+wagle') >= 0.95 else 'missed'})")
    wins = compared = 0
    for objective in OBJECTIVES:
        wagle, random_mask = objective + "+wagle", objective + "+random"
        if not {wagle, objective, random_mask} <= set(table):
            continue
        compared += 1
        beats = all(mean_of(wagle, "forget_quality") > mean_of(other, "forget_quality")
                    and share(wagle) >= share(other) - 0.01 for other in (objective, random_mask))
        wins += beats
        out.append(f"  {objective}: WAGLE FQ {mean_of(wagle, 'forget_quality'):.3g} / MU {share(wagle):.1%} vs dense "
                   f"{mean_of(objective, 'forget_quality'):.3g} / {share(objective):.1%}, random "
                   f"{mean_of(random_mask, 'forget_quality'):.3g} / {share(random_mask):.1%} -> "
                   f"{'beats both' if beats else 'does not beat both'}")
    if compared:
        out.append(f"target 2, WAGLE beats dense and random on forget quality at equal or better utility (1 point "
                   f"tolerance): {wins} of {compared} objectives ({'met' if wins >= 2 else 'missed'}; needs 2)")
    return out


def plot(paths: list[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, meta = load_rows(paths)
    panels = [(f"A. lr {UNTUNED_LR:g} for every row, no search",
               untuned_rates(rows))]
    if rates := tuned_rates(rows, meta):
        panels.append((f"B. lr chosen per row on split {meta['tune_split']}", rates))
    measured = [o for o in OBJECTIVES if any(r["method"].split("+")[0] == o for r in rows)]  # one column each
    figure, grid = plt.subplots(len(panels), len(measured), figsize=(13 * len(measured) / 3, 4 * len(panels)),
                                sharey=True, squeeze=False)
    markers = {"": "o", "random": "x", "magnitude": "s", "saliency": "^", "wagle": "*"}
    colors = {"": "tab:blue", "random": "tab:orange", "magnitude": "tab:brown", "saliency": "tab:red",
              "wagle": "tab:green"}
    for axes, (title, panel_rates) in zip(grid, panels, strict=True):
        _, table = authors_table(rows, meta, panel_rates)
        original = table["original"][0]["model_utility"]
        for axis, objective in zip(axes, measured, strict=True):
            for mask, marker in markers.items():
                entries = table.get(method_name(objective, mask), [])
                if entries:
                    axis.scatter([r["model_utility"] / original for r in entries],
                                 [max(r["forget_quality"], 1e-12) for r in entries], marker=marker,
                                 color=colors[mask], s=90 if mask == "wagle" else 40, label=mask or "no mask")
            for label, marker in (("original", "P"), ("retrain (other seed)", "D")):
                entries = table.get(label, [])
                if entries:
                    axis.scatter([r["model_utility"] / original for r in entries],
                                 [max(r["forget_quality"], 1e-12) for r in entries], marker=marker, color="grey",
                                 label=label)
            axis.axhline(0.05, color="grey", lw=0.8, ls="--")
            axis.axvline(0.95, color="grey", lw=0.8, ls=":")
            axis.set_yscale("log")
            axis.set_title(f"{title}: {objective}", fontsize=9)
            axis.set_xlabel("model utility / original's")
        axes[0].set_ylabel("forget quality (KS p-value, log)")
        axes[min(1, len(axes) - 1)].legend(fontsize=7)
    figure.suptitle("Fictitious authors, forget 10% (report split): one point per unlearning seed")
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summary", action="store_true", help="print the tables of every worker's state, plot")
    parser.add_argument("--results", type=Path, default=RESULTS.parent, help="folder of wagle-w<k>.json states")
    parser.add_argument("--worker", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the rows (run one per worker)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--device", default=None)
    parser.add_argument("--protocols", nargs="+", default=["authors", "capitals"])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument("--masks", nargs="+", default=list(MASKS), help="mask scores; '' is no mask")
    parser.add_argument("--methods", nargs="+", default=None, help="explicit method names (overrides the grid)")
    parser.add_argument("--no-tune", action="store_true", help="use the first of --lrs for every row, untuned")
    parser.add_argument("--tune-split", type=int, default=0)
    parser.add_argument("--report-split", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--reference-seeds", type=int, nargs=2, default=[1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--mask-ratio", type=float, default=0.2)
    parser.add_argument("--authors", type=int, default=20)
    parser.add_argument("--questions", type=int, default=10)
    parser.add_argument("--retain-questions", type=int, default=20)
    parser.add_argument("--capitals-forget", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--finetune-epochs", type=int, default=FINETUNE.epochs)
    parser.add_argument("--deadline", type=float, default=None, help="minutes; stop cleanly (resumable) after it")
    args = parser.parse_args()
    args.finetune = FINETUNE.model_copy(update={"epochs": args.finetune_epochs})
    prefix = "wagle" if "authors" in args.protocols else "wagle-capitals"  # separate runs of capitals alone
    args.state = args.results / f"{prefix}-w{args.worker}.json"
    if not args.summary:
        try:
            run(args)
        except OutOfTime:
            print("deadline reached; rerun the same command to resume", flush=True)
        return
    paths = sorted(args.results.glob("wagle-*w[0-9]*.json"), key=lambda p: ("capitals" in p.name, p.name))
    text = summary(paths)
    print(text)
    (args.results / "wagle.txt").write_text(text + "\n")
    plot(paths, args.results / "wagle.png")


if __name__ == "__main__":
    main()
