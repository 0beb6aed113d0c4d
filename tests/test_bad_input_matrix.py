"""Careless and hostile input, every command and every scenario kind: one clear line, nothing lost, nothing written
where it does not belong (issue 21).

Each case is a row of data (id, argv builder, expected exit status, fragments of the message) and `check_case` runs
it through the command line in-process, with the working folder in `tmp_path` (so a default `runs/` would land
there), and checks the whole contract:

1. the exit status: 2 for bad input, 1 where `verify` finds a mismatch;
2. exit 2: standard error is exactly one non-empty line starting `safeedit`, no traceback, naming the problem (the
   fragments: the file or field); exit 1 (`verify`): every line says MISMATCH and one names the tampered file;
3. every input (all of `tmp_path`, where each case puts its inputs, and the package's shipped models) is
   byte-identical afterwards;
4. nothing appeared anywhere: not under the output path, not next to it, not in `runs/`.

Every `run` case not marked `starts` must be refused while the scenario is validated, before any model is loaded
(all kinds but classification are such cases): the job loop is replaced by a tripwire that turns a scenario passing
validation into a failure. The few `starts` cases find the problem in the model or data, so they run with `-q`: the
step lines (`[safeedit] ...`) a job prints before it are progress, not part of the error. Only the file-size limit
case runs in a subprocess (a limit set with setrlimit cannot be lifted again in this process).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from helpers import QUICK_SCENARIO

import safeedit
from safeedit.cli import main

SHIPPED = Path(safeedit.__file__).parent / "models" / "shipped"

# --- the contract ----------------------------------------------------------------------------------------------


def tree(root: Path) -> dict[str, str]:
    """Every file and folder below `root`: relative path -> SHA-256 of the bytes and the mode (folders: 'dir')."""
    entries = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        mode = oct(path.lstat().st_mode & 0o7777)
        if path.is_symlink():
            entries[rel] = f"link -> {os.readlink(path)}"
        elif path.is_dir():
            entries[rel] = f"dir {mode}"
        else:
            entries[rel] = f"{hashlib.sha256(path.read_bytes()).hexdigest()} {mode}"
    return entries


def difference(before: dict[str, str], after: dict[str, str]) -> list[str]:
    appeared = [f"appeared: {p}" for p in sorted(set(after) - set(before))]
    vanished = [f"vanished: {p}" for p in sorted(set(before) - set(after))]
    changed = [f"changed: {p}" for p in sorted(set(before) & set(after)) if before[p] != after[p]]
    return appeared + vanished + changed


class Tripwire:
    """Unpickling this creates a file: a case proves nothing was unpickled by finding no new file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


class Ctx:
    """Where one case puts its inputs (`in/`) and names its output (`out/...`), inside the working folder."""

    def __init__(self, root: Path, assets: dict[str, Path]) -> None:
        self.root, self.assets = root, assets
        self.inputs = root / "in"
        self.inputs.mkdir()

    def file(self, name: str, content: bytes | str) -> str:
        path = self.inputs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)

    def folder(self, name: str) -> str:
        path = self.inputs / name
        path.mkdir(parents=True)
        return str(path)

    def yaml(self, doc, name: str = "scenario.yaml") -> str:
        return self.file(name, doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))

    def copy(self, asset: str, name: str | None = None) -> str:
        """A private copy of a module asset (a model folder, a mask, the run folder)."""
        source, target = self.assets[asset], self.inputs / (name or self.assets[asset].name)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
        return str(target)

    def pickle(self, name: str) -> str:
        """A pickle that would create `in/UNPICKLED` if anything unpickled it."""
        return self.file(name, pickle.dumps({"w": Tripwire(str(self.inputs / "UNPICKLED"))}, protocol=2))

    def out(self, name: str = "out") -> str:
        return str(self.root / "out" / name)


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Ctx], list[str]]
    code: int
    fragments: tuple[str, ...]
    starts: bool = False  # `run` only: the job may start (the problem is found while loading model or data)
    fsize: int | None = None  # run in a subprocess with this file-size limit (RLIMIT_FSIZE, bytes)


def case(id: str, argv, code: int, *fragments: str, **kwargs) -> pytest.param:
    return pytest.param(Case(id, argv, code, fragments, **kwargs), id=id)


def _job_started(job):
    raise AssertionError("the scenario passed validation and its job started; it should have been refused")


def check_case(c: Case, ctx: Ctx, capsys, monkeypatch) -> None:
    argv = [str(a) for a in c.argv(ctx)]
    if argv[0] == "run" and not c.starts:
        monkeypatch.setattr("safeedit.runners.run_job", _job_started)
    if c.starts:  # a job that starts prints its step lines ("[safeedit] ...") first: -q leaves the error alone
        argv = ["-q", *argv]
    before, shipped = tree(ctx.root), tree(SHIPPED)
    if c.fsize is not None:
        import resource

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (c.fsize, c.fsize))

        done = subprocess.run([sys.executable, "-m", "safeedit.cli", *argv], cwd=ctx.root, capture_output=True,
                              text=True, preexec_fn=limit, timeout=120)
        code, out, err = done.returncode, done.stdout, done.stderr
    else:
        capsys.readouterr()
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
        out, err = capsys.readouterr()
    assert code == c.code, f"exit {code}, expected {c.code}\nstdout: {out}\nstderr: {err}"
    if c.code == 2:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].strip() and lines[0].startswith("safeedit"), err
        assert "Traceback" not in err and "internal error" not in err, err
        assert all(f in lines[0] for f in c.fragments), f"{lines[0]!r} lacks {c.fragments}"
        assert not out.strip(), out
    else:  # verify: one line per mismatch, the tampered file among them
        lines = out.splitlines()
        assert lines and all(line.startswith("MISMATCH ") for line in lines), out
        assert any(all(f in line for f in c.fragments) for line in lines), f"{out!r} lacks {c.fragments}"
        assert not err.strip(), err
    assert difference(before, tree(ctx.root)) == []
    assert difference(shipped, tree(SHIPPED)) == []


# --- shared inputs, made once --------------------------------------------------------------------------------------


QUICK = QUICK_SCENARIO


def _tiny_models(root: Path) -> dict[str, Path]:
    """Two tiny BERT classifiers of one architecture (a base and a task model) and a tiny Llama (another)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b", "c"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]", eos_token="[SEP]")
    bert = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    built = {}
    for name, seed in (("bert", 0), ("bert-task", 1)):
        torch.manual_seed(seed)
        built[name] = BertForSequenceClassification(bert)
    torch.manual_seed(2)
    built["llama"] = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=8, intermediate_size=16,
                                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                                  pad_token_id=0))
    for name, model in built.items():
        model.save_pretrained(root / name, safe_serialization=True)
        tokenizer.save_pretrained(root / name)
    return {name: root / name for name in built}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, cache) -> dict[str, Path]:
    """Tiny model folders, a digits-cnn mask and scores file, and ONE real run folder with its report (the cheapest
    scenario: digits-forget-random with one SalUn epoch and no retraining, HTML only)."""
    root = tmp_path_factory.mktemp("assets")
    found = _tiny_models(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for argv in (["scores", "--model", "digits-cnn", "--score", "magnitude", "--out", "digits.scores.safetensors"],
                     ["mask", "--scores", "digits.scores.safetensors", "--ratio", "0.1",
                      "--out", "digits.mask.safetensors"],
                     ["mask", "--model", str(found["bert"]), "--score", "magnitude", "--ratio", "0.1",
                      "--out", "bert.mask.safetensors"]):
            assert main(["-q", *argv]) == 0, argv
        scenario = yaml.safe_load((Path(__file__).parents[1] / "scenarios" / "digits-forget-random.yaml").read_text())
        scenario.update(methods={"salun": {"epochs": 1}}, retrain=None,
                        criteria=[{"check": "salun.ta >= 0%", "why": "the run itself is what these tests need"}])
        (root / "scenario.yaml").write_text(yaml.safe_dump(scenario))
        assert main(["-q", "run", "scenario.yaml", "--out", "run", "--no-pdf"]) == 0
        assert main(["-q", "verify", "run"]) == 0  # the untampered copy verifies; each tamper case breaks one thing
    for name in ("digits.scores.safetensors", "digits.mask.safetensors", "bert.mask.safetensors", "run"):
        found[name] = root / name
    return found


@pytest.fixture
def ctx(tmp_path, monkeypatch, cache, assets) -> Ctx:
    monkeypatch.chdir(tmp_path)
    return Ctx(tmp_path, assets)


# --- builders ------------------------------------------------------------------------------------------------------


def out_file(c: Ctx) -> str:
    return c.out("result.safetensors")


def a_file(c: Ctx) -> str:
    return c.file("a-file", "I am a file, not a folder\n")


def scores(*extra: str) -> Callable[[Ctx], list[str]]:
    return lambda c: ["scores", "--model", "digits-cnn", "--score", "magnitude", *extra, "--out", out_file(c)]


def mask(*extra: str, ratio: str = "0.1") -> Callable[[Ctx], list[str]]:
    return lambda c: ["mask", "--model", "digits-cnn", "--score", "magnitude", "--ratio", ratio, *extra,
                      "--out", out_file(c)]


def with_data(command: str, score: str, role: str, name: str, content: str | bytes, model: str = "digits-cnn",
              *extra: str) -> Callable[[Ctx], list[str]]:
    """`command` with `score` reading data file `name` (holding `content`) as `role`."""
    def build(c: Ctx) -> list[str]:
        chosen = c.copy(model) if model in c.assets else model
        more = ["--ratio", "0.5"] if command == "mask" else []
        return [command, "--model", chosen, "--score", score, f"--{role}", c.file(name, content), *extra, *more,
                "--out", out_file(c)]
    return build


def merge(*extra: str, base: str = "bert", task: str = "bert-task") -> Callable[[Ctx], list[str]]:
    return lambda c: ["merge", c.copy(base), c.copy(task), *extra, "--out", c.out("merged")]


def broken_model(content: Callable[[Ctx, bytes], bytes], model: str = "bert") -> Callable[[Ctx], str]:
    """A private copy of a model folder whose model.safetensors is replaced by `content(ctx, good bytes)`."""
    def build(c: Ctx) -> str:
        folder = Path(c.copy(model))
        weights = folder / "model.safetensors"
        weights.write_bytes(content(c, weights.read_bytes()))
        return str(folder)
    return build


def pickled(c: Ctx, good: bytes) -> bytes:
    return pickle.dumps({"w": Tripwire(str(c.inputs / "UNPICKLED"))}, protocol=2)


def torch_saved(c: Ctx, good: bytes) -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    return buffer.getvalue()


def run(doc, *extra: str, out: bool = True) -> Callable[[Ctx], list[str]]:
    """`run` on a scenario (a dict, or YAML text) into out/run."""
    return lambda c: ["run", c.yaml(doc), *(["--out", c.out("run")] if out else []), "--no-pdf", *extra]


def changed(base: dict, path: str, value) -> dict:
    """`base` with the value at dotted `path` replaced (`...` removes the key)."""
    doc = json.loads(json.dumps(base, default=str))
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return doc


def quick(path: str, value) -> dict:
    return changed(QUICK, path, value)


def tampered(change: Callable[[Path], None]) -> Callable[[Ctx], list[str]]:
    def build(c: Ctx) -> list[str]:
        folder = Path(c.copy("run"))
        change(folder)
        return ["verify", str(folder)]
    return build


def edit_record(folder: Path) -> None:
    record = json.loads((folder / "record.json").read_text())
    record["results"]["salun"]["metrics"]["after"]["ua"] = 1.0
    (folder / "record.json").write_text(json.dumps(record, indent=2))


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


# --- the scenario of each other kind, valid as written (see test_base_scenarios_are_valid) ---------------------------

REQUEST = {"what": "a demonstration request"}
GENERATION = {"kind": "generation", "name": "quick-diffusion", "request": REQUEST, "model": {"name": "digits-ddpm"},
              "judge": {"name": "digits-cnn"}, "data": {"source": "digits"}, "forget": {"kind": "class", "label": 3},
              "methods": {"salun": {"ratio": 0.3, "epochs": 1}, "unmasked": {"epochs": 1}}}
LLM = {"kind": "llm-unlearning", "name": "quick-capitals", "request": REQUEST,
       "model": {"name": "smollm2-135m-instruct"}, "data": {"protocol": "capitals", "forget": 2, "seed": 1},
       "unlearning": {"epochs": 1, "lr": 3.0e-6, "batch_size": 4, "ratio": 0.2},
       "methods": {"npo+wagle": None, "graddiff": None}}
SAFETY = {"kind": "harmful-finetune", "name": "quick-antidote", "request": REQUEST,
          "model": {"name": "smollm2-135m-instruct"}, "alignment": {"epochs": 1, "lr": 5.0e-4},
          "attack": {"poison_ratio": 0.1, "finetune": {"epochs": 1, "lr": 5.0e-4, "lora_rank": 16}},
          "pruning": {"target": "update", "ratio": 0.05, "layers": "linear"},
          "methods": {"antidote": None, "random_prune": None}}
MERGE = {"kind": "merge-backdoor", "name": "quick-merge", "request": REQUEST,
         "model": {"name": "all-minilm-l6-v2", "modality": "text", "max_length": 48},
         "tasks": {"names": ["topic_en", "topic_es"], "max_train": 100, "max_test": 50},
         "attacks": {"topic_en": {"kind": "word", "word": "cf", "repeats": 1, "target": 0, "poison_rate": 0.2}},
         "methods": {"task_arithmetic": {"scale": 0.3}, "dam": {"steps": 2}}}
BASES = {"classification": QUICK, "generation": GENERATION, "llm-unlearning": LLM, "harmful-finetune": SAFETY,
         "merge-backdoor": MERGE}

HUGE_SEED = 2**64  # 18446744073709551616


def test_base_scenarios_are_valid(tmp_path):
    """Every case below breaks one field of one of these; unbroken, each validates (and loads no model)."""
    from safeedit.scenario import load_scenario

    for kind, doc in BASES.items():
        path = tmp_path / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(doc))
        assert load_scenario(path).kind == kind


# --- the cases -----------------------------------------------------------------------------------------------------

OS_FAILURES = [
    case("run-out-is-a-file", lambda c: ["run", c.yaml(QUICK), "--out", a_file(c), "--no-pdf"], 2,
         "a-file", "is a file"),
    case("run-out-under-a-file", lambda c: ["run", c.yaml(QUICK), "--out", a_file(c) + "/run", "--no-pdf"], 2,
         "a-file", "is a file, not a folder"),
    case("scores-out-is-a-folder", lambda c: [*scores()(c)[:-1], c.folder("a-folder")], 2, "a-folder", "is a folder"),
    case("mask-out-is-a-folder", lambda c: [*mask()(c)[:-1], c.folder("a-folder")], 2, "a-folder", "is a folder"),
    case("scores-out-under-a-file", lambda c: [*scores()(c)[:-1], a_file(c) + "/s.safetensors"], 2,
         "a-file", "is a file, not a folder"),
    case("mask-out-under-a-file", lambda c: [*mask()(c)[:-1], a_file(c) + "/m.safetensors"], 2,
         "a-file", "is a file, not a folder"),
    case("merge-out-exists", lambda c: [*merge()(c)[:-1], c.folder("merged")], 2, "merged", "exists"),
    case("merge-out-under-a-file", lambda c: [*merge()(c)[:-1], a_file(c) + "/merged"], 2,
         "a-file", "is a file, not a folder"),
    case("keygen-under-a-file", lambda c: ["keygen", a_file(c) + "/key.pem"], 2, "a-file", "is a file, not a folder"),
    case("report-out-is-a-file", lambda c: ["report", c.copy("run"), "--out", a_file(c), "--no-pdf"], 2,
         "a-file", "is a file; name a folder"),
    case("report-out-under-a-file", lambda c: ["report", c.copy("run"), "--out", a_file(c) + "/report",
                                               "--no-pdf"], 2, "a-file", "is a file, not a folder"),
    case("scores-file-size-limit", scores(), 2, "result.safetensors", "file-size limit", fsize=64 * 1024),
]

BAD_DATA = [
    case("fisher-jsonl-cut-last-line", with_data("scores", "fisher", "data", "d.jsonl",
                                                 '{"pixel_values": [0], "label": 0}\n{"label": 1, "pix'), 2,
         "d.jsonl", "line 2"),
    case("saliency-jsonl-string-line", with_data("mask", "saliency", "forget", "d.jsonl",
                                                 '{"text": "a b", "label": 0}\n"a b"\n', "bert"), 2,
         "d.jsonl", "line 2"),
    case("wagle-retain-empty-csv", lambda c: [*with_data("scores", "wagle", "retain", "r.csv", "", "bert")(c)[:-2],
                                              "--forget", c.file("f.csv", "text,label\na b,0\n"), "--out",
                                              out_file(c)], 2, "r.csv", "empty"),
    case("csv-label-but-no-input", with_data("scores", "saliency", "forget", "labels.csv", "label\n0\n1\n"), 2,
         "labels.csv", "no input column"),
    case("text-data-to-image-model", with_data("mask", "fisher", "data", "t.jsonl",
                                               '{"text": "a b", "label": 0}\n{"text": "c", "label": 1}\n'), 2,
         "digits-cnn reads images", "t.jsonl"),
    case("image-data-to-text-model", lambda c: ["scores", "--model", c.copy("llama"), "--score", "wanda",
                                                "--calibration", "digits:train[label=1]", "--out", out_file(c)], 2,
         "reads text", "has images"),
    case("csv-utf16", with_data("scores", "fisher", "data", "u.csv", "text,label\na,0\n".encode("utf-16"), "bert"), 2,
         "u.csv", "UTF-8"),
    case("data-file-missing", lambda c: ["scores", "--model", "digits-cnn", "--score", "fisher", "--data",
                                         str(c.inputs / "missing.jsonl"), "--out", out_file(c)], 2, "missing.jsonl",
         "neither an embedded set"),
    case("forget-retain-overlap", lambda c: ["scores", "--model", "digits-cnn", "--score", "wagle", "--forget",
                                             "digits:train", "--retain", "digits:train[label=5]", "--out",
                                             out_file(c)], 2, "forget and retain", "disjoint"),
    case("empty-data-folder", lambda c: ["mask", "--model", "digits-cnn", "--score", "saliency", "--forget",
                                         c.folder("empty-data"), "--out", out_file(c)], 2, "empty-data",
         "not a readable data folder"),
]

BAD_MODELS = [
    case("merge-base-truncated", lambda c: ["merge", broken_model(lambda c, g: g[: len(g) // 2])(c),
                                            c.copy("bert-task"), "--out", c.out("merged")], 2, "model.safetensors",
         "not a valid safetensors file"),
    case("merge-task-pickled", lambda c: ["merge", c.copy("bert"), broken_model(pickled, "bert-task")(c),
                                          "--out", c.out("merged")], 2, "bert-task/model.safetensors",
         "not a valid safetensors file"),
    case("inspect-model-empty-weights", lambda c: ["inspect", c.copy("bert.mask.safetensors"), "--model",
                                                   broken_model(lambda c, g: b"")(c)], 2,
         "model.safetensors", "not a valid safetensors file"),
    case("run-model-torch-saved", lambda c: run(quick("model", {"name": broken_model(torch_saved)(c)}))(c), 2,
         "model.safetensors", "not a valid safetensors file", starts=True),
    case("model-folder-without-config", lambda c: ["scores", "--model", c.folder("no-config"), "--score",
                                                   "magnitude", "--out", out_file(c)], 2, "no-config: no config.json"),
    case("model-config-not-json", lambda c: ["mask", "--model", _config(c, "{not json"), "--score", "magnitude",
                                             "--out", out_file(c)], 2, "bert/config.json", "not valid JSON"),
    case("model-config-without-model-type", lambda c: ["scores", "--model", _config(c, "{}"), "--score",
                                                       "magnitude", "--out", out_file(c)], 2, "bert/config.json",
         "not a model configuration"),
    case("merge-architectures-differ", merge(task="llama"), 2, "task model", "llama",
         "share the base model's architecture"),
]

def _config(c: Ctx, text: str) -> str:
    """A private copy of the tiny BERT folder whose config.json is `text`."""
    folder = Path(c.copy("bert"))
    (folder / "config.json").write_text(text)
    return str(folder)


PICKLES = [
    case("weights-pickle-named-safetensors", lambda c: [*scores()(c)[:-2], "--weights",
                                                        c.pickle("w.safetensors"), "--out", out_file(c)], 2,
         "w.safetensors", "not a readable safetensors file"),
    case("weights-dot-pt", lambda c: [*mask()(c)[:-2], "--weights", c.pickle("w.pt"), "--out", out_file(c)], 2,
         "w.pt", "pickled checkpoint"),
    case("scores-pickle-named-safetensors", lambda c: ["mask", "--scores", c.pickle("s.safetensors"), "--ratio",
                                                       "0.1", "--out", out_file(c)], 2,
         "s.safetensors", "not a readable safetensors file"),
    case("inspect-pickle-mask", lambda c: ["inspect", c.pickle("m.mask.safetensors")], 2,
         "m.mask.safetensors", "not a readable safetensors file"),
    case("inspect-compare-pickle", lambda c: ["inspect", c.copy("digits.mask.safetensors"), "--compare",
                                              c.pickle("other.mask.safetensors")], 2, "other.mask.safetensors",
         "not a readable safetensors file"),
    case("report-sign-with-a-pickle", lambda c: ["report", c.copy("run"), "--sign", c.pickle("key.pem"),
                                                 "--no-pdf"], 2, "key.pem", "not an unencrypted PEM private key"),
]

MASKS = [
    case("inspect-mask-of-another-model", lambda c: ["inspect", c.copy("bert.mask.safetensors"), "--model",
                                                     "digits-cnn"], 2, "bert.mask.safetensors: mask entry",
         "names no parameter of the model"),
    case("inspect-mask-wrong-shape", lambda c: ["inspect", _wrong_shape_mask(c), "--model", "digits-cnn"], 2,
         "classifier.weight", "has shape (3, 3)"),
    case("mask-scores-of-another-model", lambda c: ["mask", "--scores", c.copy("digits.scores.safetensors"),
                                                    "--model", c.copy("bert"), "--ratio", "0.1", "--out",
                                                    out_file(c)], 2, "digits.scores.safetensors: scores entry",
         "another architecture"),
    case("inspect-scores-not-a-mask", lambda c: ["inspect", c.copy("digits.scores.safetensors")], 2,
         "digits.scores.safetensors", "not a safeedit mask"),
    case("inspect-weights-not-a-mask", lambda c: ["inspect", str(Path(c.copy("run")) / "salun.safetensors")], 2,
         "salun.safetensors", "not a safeedit mask"),
    case("inspect-text-named-safetensors", lambda c: ["inspect", c.file("notes.safetensors", "hello\n")], 2,
         "notes.safetensors", "not a readable safetensors file"),
    case("mask-scores-is-a-mask", lambda c: ["mask", "--scores", c.copy("digits.mask.safetensors"), "--out",
                                             out_file(c)], 2, "digits.mask.safetensors", "not a scores file"),
    case("inspect-compare-other-model", lambda c: ["inspect", c.copy("digits.mask.safetensors"), "--compare",
                                                   c.copy("bert.mask.safetensors")], 2,
         "--compare", "bert.mask.safetensors", "same model"),
]


def _wrong_shape_mask(c: Ctx) -> str:
    from safeedit.masks import Mask

    path = c.inputs / "wrong.mask.safetensors"
    Mask({"classifier.weight": torch.ones(3, 3, dtype=torch.bool)}).save(path)
    return str(path)


NUMBERS = [
    case("scores-batch-size-0", scores("--batch-size", "0"), 2, "--batch-size", "below 1"),
    case("scores-max-length-0", scores("--max-length", "0"), 2, "--max-length", "below 1"),
    case("mask-threads-minus-1", mask("--threads", "-1"), 2, "--threads", "below 1"),
    case("mask-ratio-0", mask(ratio="0"), 2, "--ratio", "not in (0, 1]"),
    case("mask-ratio-1.5", mask(ratio="1.5"), 2, "--ratio", "not in (0, 1]"),
    case("mask-ratio-nan", mask(ratio="nan"), 2, "--ratio", "not in (0, 1]"),
    case("merge-seed-minus-1", merge("--method", "dare", "--seed", "-1"), 2, "--seed", "not a seed"),
    case("merge-seed-2**64", merge("--method", "dare", "--seed", str(HUGE_SEED)), 2, "--seed", "not a seed"),
    case("merge-density-1.5", merge("--method", "dare", "--density", "1.5"), 2, "--density",
         "less than or equal to 1"),
    case("merge-keep-for-task-arithmetic", merge("--keep", "0.2"), 2, "--keep", "does not apply"),
    case("random-option-seed-minus-1", lambda c: ["scores", "--model", "digits-cnn", "--score", "random", "--option",
                                                  "seed=-1", "--out", out_file(c)], 2, "option 'seed'",
         "greater than or equal to 0"),
    case("wagle-option-gamma-0", lambda c: ["scores", "--model", "digits-cnn", "--score", "wagle", "--forget",
                                            "digits:train[label=3]", "--retain", "digits:train[label!=3]",
                                            "--option", "gamma=0", "--out", out_file(c)], 2, "option 'gamma'",
         "greater than 0"),
    case("option-without-equals", scores("--option", "gamma"), 2, "--option 'gamma'", "KEY=VALUE"),
    case("device-cuda-99", scores("--device", "cuda:99"), 2, "--device cuda:99"),
    case("include-bad-regex", scores("--include", "conv["), 2, "'conv['", "not a valid regular expression"),
    case("merge-exclude-bad-regex", merge("--exclude", "classifier("), 2, "--exclude", "classifier("),
    case("scenario-seed-minus-1", run(quick("seed", -1)), 2, "seed", "greater than or equal to 0"),
    case("scenario-seed-2**64", run(quick("seed", HUGE_SEED)), 2, "seed", "less than 4294967296"),
    case("scenario-epochs-1e9", run(quick("methods", {"ga": {"epochs": 1_000_000_000}})), 2,
         "methods.ga.epochs", "--allow-long"),
    case("scenario-threads-0", run(quick("threads", 0)), 2, "threads: Input should be greater than or equal to 1"),
    case("scenario-forget-fraction-1.5", run(quick("forget", {"kind": "random", "fraction": 1.5})), 2,
         "forget.fraction", "less than 1"),
]

SCENARIOS = [
    # classification (the default kind)
    case("cls-unknown-key", run({**QUICK, "methds": {"ga": None}}), 2, "methds", "Extra inputs"),
    case("cls-misspelt-method", run(quick("methods", {"salunn": {"epochs": 1}})), 2, "unknown method 'salunn'"),
    case("cls-python-tag", run(yaml.safe_dump(QUICK) + "evil: !!python/object/apply:os.system ['touch PWNED']\n"),
         2, "not valid YAML", "python/object"),
    case("cls-name-dotdot", run(quick("name", "..")), 2, "name", "cannot name an output folder"),
    case("cls-name-dotdot-x-default-out", run(quick("name", "../x"), out=False), 2, "name",
         "cannot name an output folder"),
    case("cls-name-hidden", run(quick("name", ".hidden"), out=False), 2, "name", "cannot name an output folder"),
    case("cls-empty-file", run(""), 2, "scenario.yaml", "YAML mapping"),
    case("cls-a-list", run([QUICK]), 2, "scenario.yaml", "YAML mapping"),
    case("cls-missing-request", run(quick("request", ...)), 2, "request: Field required"),
    case("cls-unknown-kind", run(quick("kind", "safety")), 2, "unknown kind 'safety'"),
    case("cls-criteria-unknown-method", run({**QUICK, "criteria": ["salun.ua <= 5%"]}), 2,
         "criterion 'salun.ua <= 5%'", "does not produce"),
    case("cls-option-of-another-method", run(quick("methods", {"ga": {"alpha": 0.1}})), 2, "methods.ga: alpha"),
    case("cls-forget-selects-nothing", run(quick("forget", {"kind": "class", "label": 42})), 2,
         "selects no example", starts=True),
    case("cls-forget-ids-and-fraction", run(quick("forget", {"kind": "ids", "ids": [1, 2], "fraction": 0.5})), 2,
         "forget", "fraction"),
    case("cls-forget-seed-for-class", run(quick("forget", {"kind": "class", "label": 3, "seed": 5})), 2,
         "forget", "does not read 'seed'"),
    case("cls-forget-where-unknown-column", run(quick("forget", {"kind": "where", "where": {"region": "north"}})), 2,
         "filter column 'region'", "forget.where", starts=True),
    case("cls-forget-ids-of-a-missing-column", run(quick("forget", {"kind": "ids", "column": "customer",
                                                                     "ids": ["C7"]})), 2,
         "forget.column 'customer'", starts=True),
    case("cls-forget-everything", run(quick("forget", {"kind": "random", "fraction": 0.9999})), 2,
         "selects every training example", starts=True),
    case("cls-scenario-missing", lambda c: ["run", str(c.inputs / "absent.yaml")], 2, "absent.yaml",
         "no such scenario file"),
    case("cls-scenario-is-a-folder", lambda c: ["run", c.folder("scenarios.yaml")], 2, "scenarios.yaml is a folder"),
    # generation
    case("gen-misspelt-method", run(changed(GENERATION, "methods", {"salunn": None})), 2, "unknown method 'salunn'"),
    case("gen-missing-judge", run(changed(GENERATION, "judge", ...)), 2, "judge: Field required"),
    case("gen-epochs-1e9", run(changed(GENERATION, "methods.unmasked.epochs", 1_000_000_000)), 2,
         "methods.unmasked.epochs", "--allow-long"),
    case("gen-ratio-1.5", run(changed(GENERATION, "methods.salun.ratio", 1.5)), 2, "methods.salun: ratio"),
    case("gen-unknown-evaluation-key", run(changed(GENERATION, "evaluation", {"samples": 10})), 2,
         "evaluation.samples", "Extra inputs"),
    case("gen-seed-minus-1", run({**GENERATION, "seed": -1}), 2, "seed", "greater than or equal to 0"),
    # llm-unlearning
    case("llm-name-hidden", run(changed(LLM, "name", ".hidden"), out=False), 2, "name",
         "cannot name an output folder"),
    case("llm-misspelt-mask-score", run(changed(LLM, "methods", {"npo+salency": None})), 2,
         "unknown mask score 'salency'"),
    case("llm-graddiff-beta", run(changed(LLM, "methods", {"graddiff": {"beta": 0.1}})), 2, "methods.graddiff: beta"),
    case("llm-unknown-protocol", run(changed(LLM, "data.protocol", "authorz")), 2, "data:", "'authorz'"),
    case("llm-save-weights-not-a-method", run({**LLM, "save_weights": ["npo"]}), 2, "save_weights", "'npo'"),
    case("llm-data-seed-2**64", run(changed(LLM, "data.seed", HUGE_SEED)), 2, "data.capitals.seed",
         "less than 4294967296"),
    case("llm-epochs-1e9", run(changed(LLM, "unlearning.epochs", 1_000_000_000)), 2, "unlearning.epochs",
         "--allow-long"),
    # harmful-finetune (safety)
    case("safety-misspelt-method", run(changed(SAFETY, "methods", {"antidot": None})), 2, "unknown method 'antidot'"),
    case("safety-pruning-ratio-0", run(changed(SAFETY, "pruning.ratio", 0)), 2, "pruning.ratio", "greater than 0"),
    case("safety-poison-ratio-1", run(changed(SAFETY, "attack.poison_ratio", 1.0)), 2, "attack.poison_ratio",
         "less than 1"),
    case("safety-no-methods", run(changed(SAFETY, "methods", {})), 2, "methods: Dictionary should have at least 1"),
    case("safety-unknown-alignment-key", run(changed(SAFETY, "alignment", {"epoch": 1})), 2,
         "alignment.epoch", "Extra inputs"),
    case("safety-missing-model", run(changed(SAFETY, "model", ...)), 2, "model: Field required"),
    case("safety-alignment-epochs-1e9", run(changed(SAFETY, "alignment.epochs", 1_000_000_000)), 2,
         "alignment.epochs", "--allow-long"),
    case("safety-seed-2**64", run({**SAFETY, "seed": HUGE_SEED}), 2, "seed", "less than 4294967296"),
    # merge-backdoor
    case("merge-python-tag", run(yaml.safe_dump(MERGE) + "finetune: !!python/object/new:os.system [echo PWNED]\n"),
         2, "not valid YAML", "python/object"),
    case("merge-finetune-epochs-1e9", run({**MERGE, "finetune": {"epochs": 1_000_000_000}}), 2, "finetune.epochs",
         "--allow-long"),
    case("merge-unknown-task-folder", run(changed(MERGE, "tasks.names", ["topic_en", "./no-such-task"])), 2,
         "./no-such-task"),
    case("merge-attack-unknown-task", run(changed(MERGE, "attacks", {"topic_fr": {"kind": "word", "word": "cf"}})),
         2, "attacks.topic_fr"),
    case("merge-modality-audio", run(changed(MERGE, "model.modality", "audio")), 2, "model.modality",
         "'text' or 'image'"),
    case("merge-one-task", run(changed(MERGE, "tasks.names", ["topic_en"])), 2, "tasks.names", "at least 2"),
    case("merge-misspelt-method", run(changed(MERGE, "methods", {"damm": None})), 2, "unknown method 'damm'"),
    case("merge-dam-unknown-option", run(changed(MERGE, "methods.dam", {"temperature": 2})), 2,
         "methods.dam: temperature"),
    case("merge-backdoor-tasks-are-model-folders", lambda c: run(changed(MERGE, "tasks.names", [
        c.copy("bert"), c.copy("bert-task")]))(c), 2, "is a model folder", "kind: merge"),
    # kind: merge (your own models) and safeedit merge --config (a mergekit YAML)
    case("merge-own-missing-task-folder", lambda c: run(own_merge(c, [str(c.inputs / "no-such-model")]))(c), 2,
         "models[0].model", "no such model folder"),
    case("merge-own-dam-without-unlabeled", lambda c: run(own_merge(c, [c.copy("bert-task")], {"dam": None}))(c),
         2, "methods.dam", "unlabeled", "models[0]"),
    case("merge-own-task-of-another-base", lambda c: run(own_merge(c, [c.copy("llama")]))(c), 2,
         "task model", "llama", "share the base model's architecture"),
    case("merge-config-unknown-method", lambda c: merge_config(c, merge_method="slerp"), 2, "merge_method",
         "'slerp' is not supported", "ties"),
    case("merge-config-density-0", lambda c: merge_config(c, parameters={"density": 0}), 2, "parameters.density",
         "not in (0, 1]"),
    case("merge-config-unknown-parameter", lambda c: merge_config(c, parameters={"epsilon": 0.1}), 2,
         "parameters.epsilon", "not a parameter of ties"),
    case("merge-config-and-scale", lambda c: [*merge_config(c)[:-2], "--scale", "0.5", "--out", c.out("merged")], 2,
         "--scale does not go with --config"),
]


def own_merge(c: Ctx, tasks: list[str], methods: dict | None = None) -> dict:
    """A kind: merge scenario of the tiny BERT base and `tasks`."""
    return {"kind": "merge", "name": "own-merge", "request": REQUEST, "base_model": c.copy("bert"),
            "models": [{"model": task} for task in tasks], "methods": methods or {"task_arithmetic": None}}


def merge_config(c: Ctx, **changes) -> list[str]:
    """`merge --config` on a mergekit YAML (TIES of the tiny BERT base and task model) with `changes`."""
    config = {"merge_method": "ties", "base_model": c.copy("bert"),
              "models": [{"model": c.copy("bert-task"), "parameters": {"weight": 1.0, "density": 0.5}}], **changes}
    return ["merge", "--config", c.yaml(config, "merge.yaml"), "--out", c.out("merged")]

def _project(c: Ctx) -> str:
    """A folder of the user's own files that holds the scenario too."""
    c.file("project/notes.txt", "my own notes\n")
    return c.yaml(QUICK, "project/scenario.yaml")


RUN_FOLDERS = [
    case("run-into-a-non-empty-folder", lambda c: ["run", c.yaml(QUICK), "--out", c.copy("run"), "--no-pdf"], 2,
         "already holds files", "--overwrite"),
    case("run-overwrite-the-scenario-folder", lambda c: ["run", _project(c), "--out", str(c.inputs / "project"),
                                                         "--overwrite", "--no-pdf"], 2,
         "holds the scenario file", "project/scenario.yaml"),
    case("run-overwrite-a-folder-that-is-no-run", lambda c: ["run", c.yaml(QUICK), "--out",
                                                             str(Path(c.file("photos/a.png", b"png")).parent),
                                                             "--overwrite", "--no-pdf"], 2,
         "photos", "no earlier run"),
    case("run-overwrite-the-working-folder", lambda c: ["run", c.yaml(QUICK), "--out", ".", "--overwrite",
                                                        "--no-pdf"], 2, "--out .", "working folder"),
]

VERIFY = [
    case("verify-changed-report", tampered(lambda f: flip_a_byte(f / "report.html")), 1, "report.html",
         "SHA-256 mismatch"),
    case("verify-added-file", tampered(lambda f: (f / "notes.txt").write_text("added\n")), 1, "notes.txt",
         "extra file"),
    case("verify-removed-mask", tampered(lambda f: (f / "salun.mask.safetensors").unlink()), 1,
         "salun.mask.safetensors", "missing"),
    case("verify-edited-record", tampered(edit_record), 1, "record.json", "integrity hash mismatch"),
    case("verify-changed-weights", tampered(lambda f: flip_a_byte(f / "salun.safetensors")), 1,
         "salun.safetensors", "SHA-256 mismatch"),
    case("verify-pubkey-on-unsigned-run", lambda c: ["verify", c.copy("run"), "--pubkey", _public_key(c)], 1,
         "record.json", "not signed"),
    case("verify-pubkey-not-a-key", lambda c: ["verify", c.copy("run"), "--pubkey", c.file("k.pub", "hello\n")], 2,
         "k.pub", "not an unencrypted PEM public key"),
    case("verify-removed-record", tampered(lambda f: (f / "record.json").unlink()), 1, "record.json",
         "no such record"),
    case("verify-path-mistyped", lambda c: ["verify", str(c.inputs / "rnu")], 2, "rnu", "no such run folder"),
]


def _public_key(c: Ctx) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return c.file("trusted.pub", public)


def _key_pair(c: Ctx, which: str) -> str:
    """KEY and KEY.pub from a first `keygen`; keep the one named by `which` and return KEY's path."""
    key = c.inputs / "key.pem"
    assert main(["-q", "keygen", str(key)]) == 0
    (key if which == "public" else key.with_name("key.pem.pub")).unlink()
    return str(key)


OTHER_COMMANDS = [
    case("keygen-onto-an-existing-key", lambda c: ["keygen", _key_pair(c, "private")], 2, "key.pem", "exists"),
    case("keygen-onto-an-existing-public-key", lambda c: ["keygen", _key_pair(c, "public")], 2, "key.pem.pub",
         "exists"),
    case("zoo-train-unknown-name", lambda c: ["zoo", "train", "digits-cnnn"], 2, "unknown model 'digits-cnnn'"),
    case("zoo-train-without-name", lambda c: ["zoo", "train"], 2, "give a model name"),
    case("report-folder-without-record", lambda c: ["report", c.folder("not-a-run"), "--no-pdf"], 2,
         "record.json", "no such record"),
    case("report-record-not-json", lambda c: ["report", c.file("record.json", "{cut"), "--no-pdf"], 2,
         "record.json", "not valid JSON"),
    case("report-record-wrong-schema", lambda c: ["report", c.file("record.json", '{"schema": "v0"}'), "--no-pdf"],
         2, "record.json", "'v0'"),
    case("report-sign-key-not-pem", lambda c: ["report", c.copy("run"), "--sign", c.file("key.pem", "hello\n"),
                                               "--no-pdf"], 2, "key.pem", "not an unencrypted PEM private key"),
    case("scores-needs-forget", lambda c: ["scores", "--model", "digits-cnn", "--score", "saliency", "--out",
                                           out_file(c)], 2, "needs --forget"),
    case("mask-unknown-scope", mask("--scope", "layer"), 2, "--scope", "invalid choice: 'layer'"),
]

ALL = [*OS_FAILURES, *BAD_DATA, *BAD_MODELS, *PICKLES, *MASKS, *NUMBERS, *SCENARIOS, *RUN_FOLDERS, *VERIFY,
       *OTHER_COMMANDS]


@pytest.mark.parametrize("c", ALL)
def test_bad_input(c: Case, ctx: Ctx, capsys, monkeypatch):
    check_case(c, ctx, capsys, monkeypatch)


def test_the_matrix_covers_every_command_and_kind():
    ids = [p.values[0].id for p in ALL]
    assert len(ids) == len(set(ids)) and len(ids) >= 60
    for command in ("scores", "mask", "run", "merge", "report", "verify", "keygen", "inspect", "zoo"):
        assert any(command in i for i in ids), command
    for prefix in ("cls-", "gen-", "llm-", "safety-", "merge-"):
        assert sum(i.startswith(prefix) for i in ids) >= 5, prefix
