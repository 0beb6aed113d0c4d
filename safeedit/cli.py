"""`safeedit` command line: compute attribution scores and masks from files, inspect and compare masks."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import pydantic
import torch
import torch.distributed as dist
import yaml

from safeedit.attribution import SCORES, compute_scores, get_score
from safeedit.config import SEED_LIMIT
from safeedit.errors import SafeEditError, first_problem, os_problem
from safeedit.io import check_output_path, load_safetensors, save_safetensors, sha256_file
from safeedit.masks import SCOPES, Mask
from safeedit.progress import configure as configure_output
from safeedit.sharding import process_group
from safeedit.streaming import SCORES_FORMAT

ROLE_HELP = {
    "forget": "data to forget (saliency, wagle)",
    "retain": "data to keep, paired with the forget data (wagle)",
    "calibration": "calibration data whose activations are measured (wanda)",
    "data": "data for the Fisher information (fisher)",
}
# The merges `safeedit merge` runs without data (the learned ones need a kind: merge scenario with data).
MERGE_COMMAND_METHODS = ("task_arithmetic", "ties", "dare")
DATA_SPEC_HELP = (
    "Data specs: SOURCE[:SPLIT][[COLUMN=VALUE,COLUMN!=VALUE]] where SOURCE is an embedded set (digits, "
    "fashion-mnist), a .jsonl/.csv/.parquet file, a saved data set folder or a hub id; quote specs with "
    "brackets in a shell, "
    'e.g. "digits:train[label=3]". Text is read from a \'text\' column; for a causal language model, a file of '
    'question-answer rows ({"question": ..., "answer": ...} or {"messages": [user turn, assistant turn]} per line, '
    "as llm-unlearning scenarios read them) is read through the model's chat template, the loss on the answer only."
)


def _bounded(convert: type[int] | type[float], ok: Callable[[Any], bool], why: str) -> Callable[[str], Any]:
    """An argparse type: `convert(text)`, refused in one line (what is wrong, the fix) unless `ok(value)`."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if convert is int else ''}number") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{value} {why}")
        return value
    return parse


_positive_int = _bounded(int, lambda v: v >= 1, "is below 1; give 1 or more")  # batch sizes, threads, lengths
_seed = _bounded(int, lambda v: 0 <= v < SEED_LIMIT, f"is not a seed; give 0 to {SEED_LIMIT - 1}")
_fraction = _bounded(float, lambda v: 0 < v <= 1, "is not in (0, 1]; give a share such as 0.1")


def _score_list() -> str:
    lines = []
    for name, spec in SCORES.items():
        roles = ", ".join(f"--{r}" for r in spec.roles) or "no data"
        options = ", ".join(f"{k}={f.default!r}" for k, f in spec.options.model_fields.items())
        lines.append(f"  {name:10s} {spec.summary} [needs: {roles}{'; options: ' + options if options else ''}]")
    return "scores:\n" + "\n".join(lines)


def _add_attribution_arguments(parser: argparse.ArgumentParser, scores_optional: bool = False) -> None:
    group = parser.add_argument_group("model and data")
    group.add_argument(
        "--model", help="embedded model (digits-cnn), a folder with config.json + safetensors, or a hub id"
    )
    group.add_argument("--weights", help="safetensors weights for an embedded model (default: its cached weights)")
    group.add_argument("--score", choices=sorted(SCORES), help="score function (see the list below)")
    for role, text in ROLE_HELP.items():
        group.add_argument(f"--{role}", metavar="SPEC", help=text)
    group.add_argument(
        "--include",
        action="append",
        metavar="REGEX",
        help="only parameters whose name matches (repeatable; default: all)",
    )
    group.add_argument("--exclude", action="append", metavar="REGEX", help="skip parameters whose name matches")
    group.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="score option, e.g. --option gamma=0.5 (repeatable)",
    )
    run = parser.add_argument_group("execution")
    run.add_argument("--batch-size", type=_positive_int, default=64)
    run.add_argument("--max-length", type=_positive_int, default=256, help="token limit for text data")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    run.add_argument("--threads", type=_positive_int, help="torch CPU threads (small models run fastest with 1)")
    run.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code (off by default)")


STREAM_HELP = ("read the --model checkpoint (a safetensors file, or a folder of one or of shards) one tensor at a "
               "time, for a checkpoint larger than memory: magnitude, random, or wanda with --calibration (a model "
               "folder; its layers offloaded to disk)")

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_PIPE = 0, 1, 2, 3, 130, 141
EXIT_CODES_HELP = """exit status:
  0    success (for `run`: the verdict is PASS, or the scenario declares no criteria)
  1    a FAIL verdict (`run`), or a mismatch (`verify`)
  2    a user error: bad arguments, input or configuration (one line on stderr names the problem and the fix)
  3    an internal error (a bug; -v prints the traceback)
  130  interrupted (Ctrl-C); nothing partial is left under a final name
  141  the reader of stdout went away (e.g. `| head`)"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where to read more, no usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _shared_options() -> argparse.ArgumentParser:
    """Options every command takes, before or after the command name."""
    shared = _Parser(add_help=False)
    shared.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress output, no library progress bars or warnings")
    shared.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debugging output: library logs, and the traceback of any error")
    return shared


def build_parser() -> argparse.ArgumentParser:
    from safeedit import __version__

    shared = _shared_options()
    parser = _Parser(
        prog="safeedit",
        description="Find the weights responsible for data, concepts or behaviour, and edit only those.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[shared],
    )
    parser.add_argument("--version", action="version", version=f"safeedit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parser = commands.add_parser

    def add_command(name: str, **kwargs) -> argparse.ArgumentParser:
        """A subcommand that takes the shared options and shows the exit codes in its help."""
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs["epilog"] = (kwargs.get("epilog", "") + "\n\n" + EXIT_CODES_HELP).strip()
        return add_parser(name, parents=[shared], **kwargs)

    commands.add_parser = add_command

    scores = commands.add_parser(
        "scores",
        help="compute per-parameter attribution scores and save them (safetensors)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"{_score_list()}\n\n{DATA_SPEC_HELP}\n\nexample:\n  safeedit scores --model digits-cnn "
        '--score saliency --forget "digits:train[label=3]" --out scores.safetensors',
    )
    _add_attribution_arguments(scores)
    scores.add_argument("--stream", action="store_true", help=STREAM_HELP)
    scores.add_argument("--out", required=True, help="where to write the scores (.safetensors)")
    scores.set_defaults(func=cmd_scores)

    mask = commands.add_parser(
        "mask",
        help="select a top-k mask from scores (computed now, or read with --scores) and save it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"{_score_list()}\n\n{DATA_SPEC_HELP}\n\nexamples:\n"
        '  safeedit mask --model digits-cnn --score saliency --forget "digits:train[label=3]" '
        "--ratio 0.5 --out mask.safetensors\n"
        "  safeedit mask --scores scores.safetensors --ratio 0.1 --scope row --out mask.safetensors\n"
        "  safeedit mask --stream --model my-70b-folder --score magnitude --ratio 0.01 --out mask.safetensors",
    )
    _add_attribution_arguments(mask)
    mask.add_argument("--scores", help="read scores written by `safeedit scores` instead of computing them")
    mask.add_argument("--ratio", type=_fraction, default=0.5,
                      help="share of entries to select, in (0, 1] (default 0.5)")
    mask.add_argument(
        "--scope",
        choices=SCOPES,
        default="global",
        help="count the top-k over all parameters, per tensor, or per output row (default global)",
    )
    mask.add_argument("--stream", action="store_true", help=STREAM_HELP + "; global scope")
    mask.add_argument("--out", required=True, help="where to write the mask (.safetensors)")
    mask.set_defaults(func=cmd_mask)

    run = commands.add_parser(
        "run",
        help="run a scenario: forget request, methods, retrain reference, metrics, record",
        description="Run a scenario file (see scenarios/): train or load the original model, split forget and "
        "retain data, retrain the reference, run each method, evaluate, and write weights, masks and record.json.",
    )
    run.add_argument("scenario", help="a scenario YAML file, e.g. scenarios/digits-forget-class.yaml")
    run.add_argument("--out", help="output folder (default runs/<scenario name>)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace an earlier run's output folder as a whole (default: refuse a non-empty one; "
                     "a folder without record.json, or holding the scenario, is never replaced)")
    run.add_argument("--allow-long", action="store_true",
                     help="run epochs or steps beyond the limits (1,000 epochs, 100,000 steps) that catch typos")
    run.add_argument("--no-pdf", action="store_true", help="write the HTML report only (no Chromium needed)")
    run.add_argument("--json", action="store_true", help="print a machine-readable summary (verdict, criteria, "
                     "metrics, paths) on stdout; the human-readable lines go to stderr")
    run.set_defaults(func=cmd_run)

    merge = commands.add_parser(
        "merge", help="merge fine-tunes of one base model (task arithmetic, TIES, DARE; or a mergekit YAML)",
        description="Merge task models fine-tuned from one base model: θ = θ₀ + λ Σ wᵢ τᵢ (task arithmetic), "
        "TIES, or DARE (each task vector's entries dropped at random and the rest rescaled, then task arithmetic), "
        "from arguments or from a mergekit configuration (--config: merge_method task_arithmetic, ties, dare_linear, "
        "dare_ties or linear, per-model weight and density, lambda, normalize, dtype). Arithmetic is float32. "
        "Classifier heads, parameters whose shape differs from the base and names matching --exclude keep the base "
        "model's values; the record lists them. Writes OUT as a save_pretrained folder that is also a run folder "
        "(record.json, report.html, manifest.json: `safeedit verify OUT`), whole or not at all; a task model of "
        "another base is refused before anything is written. For learned and backdoor-aware merges (AdaMerging, "
        "DAM) on your own models, write a kind: merge scenario.",
    )
    merge.add_argument("base", nargs="?", help="the pretrained model: a folder with config.json and safetensors, or "
                       "a hub id (not with --config)")
    merge.add_argument("tasks", nargs="*", help="fine-tuned task models (folders or hub ids)")
    merge.add_argument("--config", metavar="MERGE.yaml", help="a mergekit configuration (instead of BASE TASK...)")
    merge.add_argument("--out", required=True, help="output folder (must not exist)")
    merge.add_argument("--method", choices=MERGE_COMMAND_METHODS, default=None,
                       help="default task_arithmetic (with --config: its merge_method)")
    # defaults (None here) come from each method's options class; the record holds the values used
    merge.add_argument("--scale", type=float, default=None, help="λ (default: the method's own)")
    merge.add_argument("--keep", type=float, default=None, help="TIES: share of each task vector kept")
    merge.add_argument("--trim", choices=("tensor", "global"), default=None,
                       help="TIES: keep int(keep·n) entries per tensor, a zero sign sum electing + (tensor, "
                       "mergekit's; the default), or round(keep·N) over the whole vector, a zero sum electing "
                       "nothing (global, FusionBench's)")
    merge.add_argument("--density", type=float, default=None,
                       help="DARE: share of each task vector's entries kept, at random")
    merge.add_argument("--seed", type=_seed, default=0, help="DARE: seed of the random drop (default 0)")
    merge.add_argument("--exclude", default=None, help="regular expression of tensor names not merged")
    merge.add_argument("--merge-heads", action="store_true",
                       help="also merge classifier heads (only for task models fine-tuned for the same labels)")
    merge.add_argument("--pdf", action="store_true", help="also print the report to PDF (headless Chromium)")
    merge.add_argument("--stream", action="store_true",
                       help="out of core: read one tensor of each model at a time from local safetensors folders "
                       "(sharded or not) and write the merge shard by shard (peak memory a few tensors, not the "
                       "model); the same merged values, written with merge.json but no run record or report; "
                       "task models saved as the base's class")
    merge.set_defaults(func=cmd_merge)

    report = commands.add_parser(
        "report",
        help="render a run's record as a compliance report (HTML, PDF, JSON)",
        description="Render RUN (a run folder or its record.json) into report.html (self-contained, offline), "
        "report.pdf (headless Chromium) and the record JSON (schema: safeedit/report/schema.json).",
    )
    report.add_argument("run", help="a run folder written by `safeedit run`, or its record.json")
    report.add_argument("--out", help="where to write the report (default: next to the record)")
    report.add_argument("--sign", metavar="KEY", help="sign the record with this Ed25519 private key (PEM) first")
    report.add_argument("--no-pdf", action="store_true", help="write the HTML report only")
    report.add_argument("--png", action="store_true", help="also write report.png, the first A4 screen of the report")
    report.set_defaults(func=cmd_report)

    verify = commands.add_parser(
        "verify",
        help="check a run's files against the SHA-256 in its record, the record's integrity and signature",
        description="Recompute the SHA-256 of every file RUN's record names and check the record's integrity hash, "
        "its verdict and (if signed, or with --pubkey) its Ed25519 signature. Exit 0 only if all match; otherwise "
        "one line per mismatch and exit 1.",
    )
    verify.add_argument("run", help="a run folder, or a record.json")
    verify.add_argument("--pubkey", metavar="KEY.pub", help="require a signature by this Ed25519 public key (PEM)")
    verify.set_defaults(func=cmd_verify)

    keygen = commands.add_parser("keygen", help="make an Ed25519 key pair for signing records")
    keygen.add_argument("key", help="private key path (PEM, owner-only); the public key goes to KEY.pub")
    keygen.set_defaults(func=cmd_keygen)

    inspect = commands.add_parser("inspect", help="summarise a mask, check it against a model, compare two masks")
    inspect.add_argument("mask", help="a mask written by `safeedit mask`")
    inspect.add_argument("--model", help="check that every entry names a parameter of this model with the same shape")
    inspect.add_argument("--weights", help="safetensors weights for an embedded --model")
    inspect.add_argument(
        "--compare", metavar="MASK", help="another mask: report overlap (Jaccard) per layer and overall"
    )
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(func=cmd_inspect)

    zoo = commands.add_parser(
        "zoo", help="list the embedded models, or train one again here from its recipe",
        description="The embedded models ship inside the package (safetensors, SHA-256 in a manifest), so every "
        "machine starts from the same weights. `zoo train NAME` trains NAME again on this machine from its recipe "
        "and seed (cached under $SAFEEDIT_CACHE/zoo/) and says whether the bytes equal the shipped ones (another "
        "CPU's kernels usually give other bytes); a scenario uses that training with `weights: trained`.",
    )
    zoo.add_argument("action", choices=("list", "train"))
    zoo.add_argument("name", nargs="?", help="the model to train (see `safeedit zoo list`)")
    zoo.add_argument("--ship", action="store_true", help="developers: make this training the shipped copy")
    zoo.set_defaults(func=cmd_zoo)
    return parser


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SafeEditError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SafeEditError(f"--device {name}: this machine has no usable CUDA device; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SafeEditError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                            f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def _options(pairs: Sequence[str]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SafeEditError(f"--option {pair!r} should look like KEY=VALUE, e.g. gamma=0.5")
        options[key] = yaml.safe_load(value)
    return options


def _compute(args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safeedit.data import load_data, make_loader
    from safeedit.data.qa_files import dataset_chat_examples
    from safeedit.models import load_model

    if not args.model or not args.score:
        raise SafeEditError("give --model and --score (or, for `mask`, --scores FILE)")
    spec = get_score(args.score)
    options = spec.validate_options(_options(args.option))
    given = {role: getattr(args, role) for role in ROLE_HELP if getattr(args, role)}
    missing = [role for role in spec.roles if role not in given]
    if missing:
        raise SafeEditError(f"score '{args.score}' needs " + " and ".join(f"--{r} SPEC" for r in missing))
    extra = [role for role in given if role not in spec.roles]
    if extra:
        raise SafeEditError(f"score '{args.score}' does not read " + ", ".join(f"--{r}" for r in extra))
    chats = _question_answer_data(given)  # read and checked before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, args.weights, trust_remote_code=args.trust_remote_code, progress=not args.quiet)
    device = _device(args.device)
    if device.type == "cuda" and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())
    model = loaded.model.to(device)
    datasets_by_role = {role: load_data(text) for role, text in given.items() if role not in chats}
    for role, dataset in list(datasets_by_role.items()):  # a folder or hub data set of question-answer rows
        examples = dataset_chat_examples(dataset, f"data {given[role]!r}")
        if examples is not None:
            chats[role] = examples
            del datasets_by_role[role]
    if "forget" in datasets_by_role and "retain" in datasets_by_role:
        _check_disjoint(datasets_by_role["forget"], datasets_by_role["retain"])
    loaders = {
        role: make_loader(ds, model, loaded.tokenizer, args.batch_size, args.max_length)
        for role, ds in datasets_by_role.items()
    }
    loaders.update(_chat_loaders(chats, given, model, loaded.tokenizer, args))
    scores = compute_scores(
        model, args.score, loaders, include=args.include, exclude=args.exclude, options=options, progress=not args.quiet
    )
    metadata = {
        "score": args.score,
        "options": json.dumps(options, sort_keys=True),
        "model": args.model,
        "source_weights_sha256": loaded.weights_sha256,
        **{f"data_{role}": text for role, text in given.items()},
        **{f"examples_{role}": str(len(ds)) for role, ds in [*datasets_by_role.items(), *chats.items()]},
    }
    return scores, metadata


def _question_answer_data(given: dict[str, str]) -> dict:
    """role -> chat examples, for the data specs that name local question-answer files (`question`/`answer` or
    `messages` rows, as scenarios read them; `safeedit.data.qa_files`)."""
    from safeedit.data.qa_files import spec_chat_examples

    read = {role: spec_chat_examples(text) for role, text in given.items()}
    return {role: examples for role, examples in read.items() if examples is not None}


def _chat_loaders(chats: dict, given: dict[str, str], model, tokenizer, args: argparse.Namespace) -> dict:
    """Batches of question-answer data for a causal LM: through its chat template, loss on the answer tokens only
    (what the LLM unlearning objectives and `npo+wagle` masks read)."""
    from safeedit.data.chat import chat_loader
    from safeedit.data.loaders import is_causal_lm
    from safeedit.unlearn.lm_objectives import check_forget_retain

    if not chats:
        return {}
    role = next(iter(chats))
    if not is_causal_lm(model) or tokenizer is None:
        raise SafeEditError(f"--{role} {given[role]} holds questions and answers, which a causal language model "
                            f"reads through its chat template; {args.model} is not one (give a *ForCausalLM folder "
                            "with its tokenizer, or data with a 'text' column)")
    if "forget" in chats and "retain" in chats:
        check_forget_retain(chats["forget"], chats["retain"])
    return {role: chat_loader(tokenizer, examples, args.batch_size, args.max_length)
            for role, examples in chats.items()}


def _check_disjoint(forget, retain) -> None:
    if "id" in forget.column_names and "id" in retain.column_names:
        overlap = set(forget["id"]) & set(retain["id"])
        if overlap:
            raise SafeEditError(
                f"forget and retain data share {len(overlap)} example id(s) (e.g. {sorted(overlap)[0]!r}); "
                "make them disjoint, e.g. with [label=3] and [label!=3]"
            )


def cmd_scores(args: argparse.Namespace) -> None:
    check_output_path(args.out)  # before the scores are computed
    if args.stream:
        from safeedit.streaming import write_checkpoint_scores

        score, given, data = _streamed_arguments(args)
        count = write_checkpoint_scores(args.model, args.out, score, args.include, args.exclude,
                                        _options(args.option), data, not args.quiet,
                                        {f"data_{role}": text for role, text in given.items()})
        print(f"wrote {args.out}: {score} scores for {count:,} weights, streamed from {args.model} "
              f"(sha256 {sha256_file(args.out)[:16]}…)")
        return
    with process_group(_device(args.device)) as writes:
        scores, metadata = _compute(args)
        if writes:
            _write_scores(scores, metadata, args)


def _write_scores(scores: dict[str, torch.Tensor], metadata: dict[str, str], args: argparse.Namespace) -> None:
    save_safetensors(scores, args.out, {"format": SCORES_FORMAT, **metadata})
    count = sum(t.numel() for t in scores.values())
    print(
        f"wrote {args.out}: {args.score} scores for {count:,} weights in {len(scores)} tensors "
        f"(sha256 {sha256_file(args.out)[:16]}…)"
    )


def _read_scores(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, metadata = load_safetensors(path)
    if metadata.get("format") != SCORES_FORMAT:
        raise SafeEditError(f"{path}: not a scores file written by `safeedit scores`")
    metadata.pop("format")
    return tensors, metadata


def cmd_mask(args: argparse.Namespace) -> None:
    check_output_path(args.out)
    if args.stream:
        _streamed_mask(args)
        return
    if args.scores:
        scores, metadata = _read_scores(args.scores)
        metadata["scores_sha256"] = sha256_file(args.scores)
        if args.model:
            from safeedit.models import load_model

            loaded = load_model(args.model, args.weights, progress=not args.quiet)
            Mask({n: torch.zeros(t.shape, dtype=torch.bool) for n, t in scores.items()}).check_matches(
                loaded.model, f"{args.scores}: scores")
    else:
        with process_group(_device(args.device)) as writes:
            scores, metadata = _compute(args)
        if not writes:
            return
    mask = Mask.top_k(scores, args.ratio, args.scope, metadata)
    mask.save(args.out)
    _print_summary(mask, args.out)


def _streamed_mask(args: argparse.Namespace) -> None:
    """`mask --stream`: the global top-k of a data-free score over a checkpoint read one tensor at a time."""
    from safeedit.streaming import checkpoint_mask

    if args.scores:
        raise SafeEditError("--stream reads a checkpoint: give --model (a safetensors file or folder), not --scores")
    if args.scope != "global":
        raise SafeEditError(f"--stream selects over the whole checkpoint (--scope global), not --scope {args.scope}; "
                            "drop --scope or --stream")
    score, _, data = _streamed_arguments(args)
    checkpoint_mask(args.model, args.out, args.ratio, score, args.include, args.exclude, _options(args.option),
                    data=data, progress=not args.quiet)
    _print_summary(Mask.load(args.out), args.out)


def _streamed_arguments(args: argparse.Namespace) -> tuple[str, dict[str, str], dict[str, Any] | None]:
    """`--stream`'s score (default magnitude), its data specs and their token batches (Wanda's calibration)."""
    if not args.model:
        raise SafeEditError("--stream reads a checkpoint: give --model (a safetensors file or a model folder)")
    score = args.score or "magnitude"
    spec = get_score(score)
    given = {role: getattr(args, role) for role in ROLE_HELP if getattr(args, role)}
    if args.weights or any(role not in spec.roles for role in given):
        raise SafeEditError(f"--stream reads the weights from --model and {score} reads "
                            f"{' '.join('--' + r for r in spec.roles) or 'no data'}: drop --weights and the other "
                            "data options, or --stream")
    if args.threads:
        torch.set_num_threads(args.threads)
    return score, given, _streamed_data(args.model, given, args) if spec.statistics and given else None


def _streamed_data(folder: str, given: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """Token batches of the data specs for the model in `folder`, tokenized by its tokenizer (the model itself is
    not loaded: an empty one of its class stands in)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from safeedit.data import load_data, make_loader

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        with init_empty_weights():
            stand_in = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SafeEditError(f"{folder}: no causal LM with its tokenizer to read ({reason}); give a save_pretrained "
                            "folder with config.json and tokenizer files") from None
    return {role: make_loader(load_data(spec), stand_in, tokenizer, args.batch_size, args.max_length)
            for role, spec in given.items()}


def _print_summary(mask: Mask, path: str, limit: int = 12) -> None:
    meta = mask.metadata
    print(f"mask {path}")
    print(
        f"  score {meta.get('score', '?')}, ratio {meta.get('ratio')}, scope {meta.get('scope')}: "
        f"{mask.selected:,} of {mask.total:,} weights selected ({mask.density:.1%})"
    )
    if "source_weights_sha256" in meta:
        print(f"  source weights sha256 {meta['source_weights_sha256']}")
    print(f"  file sha256 {sha256_file(path)}")
    stats = mask.layer_stats()
    width = max(len(s["name"]) for s in stats)
    print(f"  {'tensor':{width}s}  {'selected':>10s}  {'of':>10s}  density")
    for s in stats[:limit]:
        print(f"  {s['name']:{width}s}  {s['selected']:>10,}  {s['total']:>10,}  {s['density']:7.1%}")
    if len(stats) > limit:
        print(f"  ... {len(stats) - limit} more tensors (safeedit inspect {path})")


def cmd_run(args: argparse.Namespace) -> None:
    from safeedit.report import find_chromium, write_report
    from safeedit.runners import run_scenario

    pdf = not args.no_pdf and find_chromium() is not None
    if not args.no_pdf and not pdf:
        print("no Chromium found, so no PDF (sudo apt-get install chromium); the HTML report has the same content",
              file=sys.stderr)
    rendered = []

    def render(record_path: Path, final: Path) -> None:  # inside the run's transaction: the report is part of it
        rendered.append(write_report(record_path, pdf=pdf, shown_folder=final))

    record_path = run_scenario(args.scenario, args.out, progress=not args.quiet, overwrite=args.overwrite,
                               then=render, allow_long=args.allow_long)
    if int(os.environ.get("RANK", "0")) != 0:  # another process of a sharded run: the first one prints
        return EXIT_FAIL if json.loads(record_path.read_text())["verdict"]["passed"] is False else EXIT_OK
    record = json.loads(record_path.read_text())
    human = sys.stderr if args.json else sys.stdout
    _print_results(record["results"], record["kind"], human)
    moved = {key: record_path.parent / path.name for key, path in vars(rendered[0]).items() if path is not None}
    files = dataclasses.replace(rendered[0], **moved)  # the paths where the transaction put them
    print(_verdict_line(record["verdict"]), file=human)
    print(f"record: {record_path}", file=human)
    if files.pdf:
        print(f"report (PDF): {files.pdf}", file=human)
    print(f"report: {files.html}", file=human)
    if args.json:
        print(json.dumps(_run_summary(record, record_path, files), indent=2))
    return EXIT_FAIL if record["verdict"]["passed"] is False else EXIT_OK


def _run_summary(record: dict, record_path, files) -> dict:
    """What `run --json` prints: the verdict, each criterion, every result's metrics and the files written."""
    return {
        "scenario": record["scenario"]["name"], "kind": record["kind"],
        "verdict": {"passed": record["verdict"]["passed"], "criteria": [
            {key: row[key] for key in ("check", "measured", "threshold", "passed")}
            for row in record["verdict"]["criteria"]]},
        "metrics": {name: entry["metrics"]["after"] for name, entry in record["results"].items()},
        "paths": {"folder": str(record_path.parent), "record": str(record_path), "report_html": str(files.html),
                  "report_pdf": str(files.pdf) if files.pdf else None,
                  "outputs": [entry["path"] for entry in record["outputs"]]},
    }


def cmd_merge(args: argparse.Namespace) -> None:
    import re

    from safeedit.merge.mergekit import read_mergekit
    from safeedit.methods import get_method
    from safeedit.runners.merge_models import run_merge
    from safeedit.scenario import ModelMergeScenario

    out = Path(args.out)
    if out.exists():
        raise SafeEditError(f"{out} exists; choose a new output folder (nothing is overwritten)")
    check_output_path(out, folder=True)  # a path through a file, before the models are loaded
    if args.exclude is not None:
        try:
            re.compile(args.exclude)
        except re.error as error:
            raise SafeEditError(f"--exclude {args.exclude!r} is not a valid regular expression ({error})") from None
    notes: list[str] = []
    if args.config:
        clash = next((f"--{key}" for key in ("method", "scale", "keep", "density") if getattr(args, key) is not None),
                     "BASE and TASK" if args.base or args.tasks else None)
        if clash:
            raise SafeEditError(f"{clash} does not go with --config; the configuration says it (merge_method, "
                                "base_model, models, parameters: lambda, density)")
        fields, notes = read_mergekit(args.config)
        (method, given), = fields.pop("methods").items()
    else:
        if not args.base or not args.tasks:
            raise SafeEditError("give the base model and at least one task model (safeedit merge BASE TASK... --out "
                                "DIR), or a mergekit configuration with --config")
        method = args.method or "task_arithmetic"
        given = {key: getattr(args, key) for key in ("scale", "keep", "density") if getattr(args, key) is not None}
        fields = {"base_model": args.base, "models": [{"model": task} for task in args.tasks]}
    # the method's options class holds the defaults; a flag the method does not read is refused
    if args.trim is not None:
        given["trim"] = args.trim
    spec = get_method("merge", method)
    unread = [key for key in given if key not in spec.options.model_fields]
    if unread:
        raise SafeEditError(f"--{unread[0]} does not apply to --method {method}")
    try:
        options = spec.options(**given)
    except pydantic.ValidationError as error:
        raise SafeEditError(f"--{first_problem(error)}") from None
    name = re.sub(r"[^\w.\-]", "-", out.name).lstrip(".-") or "merge"
    document = {"kind": "merge", "name": name[:100], "seed": args.seed, "exclude": args.exclude,
                "merge_heads": args.merge_heads, **fields,
                "request": {"what": f"merge {len(fields['models'])} fine-tunes of {fields['base_model']} ({method})"},
                "methods": {method: options.model_dump()}}
    try:
        scenario = ModelMergeScenario(**document)
    except pydantic.ValidationError as error:
        raise SafeEditError(f"{args.config or 'merge'}: {first_problem(error)}") from None
    scenario.method_options()  # folders and data named, before any model loads
    if args.stream:
        if args.pdf:
            raise SafeEditError("--pdf does not go with --stream: a streamed merge writes no report")
        from safeedit.merge.streaming import stream_merge

        summary = stream_merge(scenario, out, notes=notes)
        print(f"merged {len(scenario.models)} task models into {out} ({method}, streamed; {summary['merged_tensors']} "
              f"tensors merged, {len(summary['excluded'])} kept from the base model: see merge.json)")
        return
    record_path = run_merge(scenario, out, Path(args.config) if args.config else None, _merge_command(args),
                            pdf=args.pdf, notes=notes)
    record = json.loads(record_path.read_text())
    excluded = len(record["model"]["excluded"])
    print(f"merged {len(scenario.models)} task models into {out} ({method}; {len(record['model']['merged_tensors'])} "
          f"tensors merged, {excluded} kept from the base model: see the record)")
    print(f"record: {record_path}")
    print(f"report: {out / 'report.html'}")


def _merge_command(args: argparse.Namespace) -> list[str]:
    """The `safeedit merge` command line that reproduces this merge (the record's `command`)."""
    argv = ["safeedit", "merge", *([args.base] if args.base else []), *args.tasks]
    for flag in ("config", "method", "scale", "keep", "trim", "density", "exclude"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    argv += ["--seed", str(args.seed), *(["--merge-heads"] if args.merge_heads else []), "--out", str(args.out)]
    return argv


def _verdict_line(verdict: dict) -> str:
    if verdict["passed"] is None:
        return "verdict: none (the scenario declares no criteria)"
    failed = [row["check"] for row in verdict["criteria"] if not row["passed"]]
    total = len(verdict["criteria"])
    if not failed:
        return f"verdict: PASS ({total} criteria)"
    return f"verdict: FAIL ({len(failed)} of {total}: {'; '.join(failed)})"


def cmd_report(args: argparse.Namespace) -> None:
    from safeedit.report import write_report

    files = write_report(args.run, args.out, pdf=not args.no_pdf, sign_key=args.sign, png=args.png)
    for label, path in (("record", files.record), ("signature", files.signature), ("first page (PNG)", files.png),
                        ("report (PDF)", files.pdf), ("report", files.html)):
        if path is not None:
            print(f"{label}: {path}")


def cmd_verify(args: argparse.Namespace) -> None:
    from safeedit.report import verify_run

    result = verify_run(args.run, args.pubkey)
    for problem in result.problems:
        print(f"MISMATCH {problem}")
    if not result.ok:
        return EXIT_FAIL
    print(f"verified {result.record_path}: " + ", ".join(result.checked))
    if result.files:
        print("files checked: " + ", ".join(result.files))
    return EXIT_OK


def cmd_keygen(args: argparse.Namespace) -> None:
    from safeedit.report.signing import generate_key, key_fingerprint, load_public_key

    private, public = generate_key(args.key)
    print(f"private key: {private} (keep it secret)\npublic key: {public} (fingerprint "
          f"{key_fingerprint(load_public_key(public))})")


def _print_results(results: dict, kind: str, file=None) -> None:
    from safeedit.report.texts import headline_metrics

    print_ = functools.partial(print, file=file or sys.stdout)
    measured = {m for entry in results.values() for m in entry["metrics"]["after"]}
    columns = headline_metrics(kind, measured) or ("ua", "ra", "ta", "mia_efficacy", "gap_to_retrain")
    print_(f"{'method':16s}" + "".join(f"{c[:19]:>20s}" for c in columns) + f"{'wall s':>9s}")
    for name, entry in results.items():
        after = entry["metrics"]["after"]
        cells = "".join(f"{after[c]:20.3f}" if after.get(c) is not None else f"{'-':>20s}" for c in columns)
        wall = entry.get("wall_time_s")
        print_(f"{name:16s}{cells}{wall if wall is None else round(wall, 1)!s:>9}")


def cmd_inspect(args: argparse.Namespace) -> None:
    mask = Mask.load(args.mask)
    result = mask.summary()
    if args.model:
        from safeedit.models import load_model

        mask.check_matches(load_model(args.model, args.weights).model, f"{args.mask}: mask")
        result["model_check"] = f"every entry matches a parameter of {args.model}"
    if args.compare:
        other = Mask.load(args.compare)
        if not set(mask.tensors) & set(other.tensors):
            raise SafeEditError(f"--compare {args.compare} shares no tensor name with {args.mask}; compare masks made "
                                "for the same model")
        try:
            result["jaccard"] = mask.jaccard(other)
        except SafeEditError as error:
            raise SafeEditError(f"--compare {args.compare}: {error}; compare masks made for the same model") from None
        result["jaccard_per_tensor"] = {
            name: Mask({name: t}).jaccard(Mask({name: other.tensors[name]}))
            for name, t in mask.tensors.items()
            if name in other.tensors
        }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    _print_summary(mask, args.mask, limit=10_000)
    if "model_check" in result:
        print(f"  {result['model_check']}")
    if args.compare:
        print(f"  overlap with {args.compare}: Jaccard {result['jaccard']:.3f}")


def cmd_zoo(args: argparse.Namespace) -> int:
    from safeedit.models.shipped import folder_hashes, manifest, ship, zoo_entries

    entries, shipped = zoo_entries(), manifest()
    if args.action == "list":
        for name, entry in entries.items():
            files = shipped.get(name, {}).get("files", {})
            local = entry.trained_folder()
            state = ("not trained here" if not local.is_dir() else
                     "trained here: same bytes as shipped" if folder_hashes(local) == files else
                     "trained here: other bytes than shipped")
            weights = next((sha for path, sha in files.items() if path.endswith(".safetensors")), None)
            print(f"{name:26s} {entry.summary}; shipped {weights[:16] + '…' if weights else 'no'}; {state}")
        return EXIT_OK
    if args.name not in entries:
        problem = f"unknown model {args.name!r}" if args.name else "give a model name"
        raise SafeEditError(f"zoo train: {problem}; choose one of {', '.join(entries)}")
    entry = entries[args.name]
    folder = entry.train_here(not args.quiet)
    same = folder_hashes(folder) == shipped.get(args.name, {}).get("files")
    print(f"trained {args.name} into {folder}: {'the same bytes as' if same else 'other bytes than'} the shipped "
          "weights" + ("" if same else " (expected on another CPU or kernel set); use it with `weights: trained`"))
    if args.ship:
        ship(entry, folder)
        print(f"shipped: {args.name} now ships this training (commit safeedit/models/shipped/)")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit status follows EXIT_CODES_HELP."""
    args = build_parser().parse_args(argv)
    args.quiet, args.verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    try:
        configure_output(quiet=args.quiet, verbose=args.verbose)
        status = args.func(args) or EXIT_OK
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not in the interpreter's exit
        return status
    except SafeEditError as error:
        if args.verbose:
            traceback.print_exc()
        print(f"safeedit: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("safeedit: interrupted; nothing partial was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader closed stdout (`| head`): point stdout at /dev/null so the interpreter's final flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE
    except OSError as error:  # a file the system refused (full disk, limits, permissions): one line, the fix
        if args.verbose:
            traceback.print_exc()
        print(f"safeedit: error: {os_problem(error)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:  # a bug: one line, the traceback on request
        if args.verbose:
            traceback.print_exc()
        print(f"safeedit: internal error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
              " (a bug; rerun with -v for the traceback and please report it)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
