"""mergekit's YAML merge configuration, read into a `kind: merge` scenario (`safeedit merge --config merge.yaml`)
for the merge methods both tools define the same way.

    merge_method: ties                  # task_arithmetic | ties | dare_linear | dare_ties | linear
    base_model: path/to/base            # a save_pretrained folder or a hub id
    models:
      - model: path/to/fine-tune
        parameters: {weight: 1.0, density: 0.5}
    parameters: {normalize: true, lambda: 1.0, int8_mask: true}
    dtype: bfloat16

The definitions are mergekit's (`mergekit/merge_methods/generalized_task_arithmetic.py`, `registry.py`,
`sparsify.py`, `linear.py`, `config.py`), with safeedit's methods set to compute them:
- `weight` (required, per model or under `parameters` for all) is wᵢ; `density` (per model or global, default 1:
  nothing trimmed or dropped) the share of each task vector TIES keeps by magnitude per tensor (int(density · n),
  at least 1) or DARE keeps at random; a model's own value wins over the global one, as in mergekit.
- `lambda` (default 1, whatever safeedit's own command defaults to) scales the merged delta.
- `normalize` divides by Σ wᵢ (TIES: by the weights of the models that agree with the elected sign); its default
  is mergekit's per method: false for task_arithmetic and dare_*, true for ties and linear.
- `rescale` (dare_*, default true) scales each kept tensor back to its L1 norm; false keeps the entries as drawn.
- `int8_mask` only sets the dtype of mergekit's sign mask: no effect on the result; accepted and noted.
- `dtype`: mergekit computes in it; here the arithmetic is float32 and the merge is written as `out_dtype`, else
  `dtype`, else the base model's own dtype.
- A model that is the base model adds no task vector (mergekit skips it). `linear` is Σ wᵢ θᵢ / Σ wᵢ over the
  models listed: task arithmetic with normalize and λ = 1 relative to any reference (the base model if given,
  else the first model), since the normalised sum does not depend on the reference.
Not read (one line naming what is): other merge methods, `slices` and `modules`, parameter lists (gradients) and
filters, tokenizer settings other than the base model's tokenizer, LoRA references (`model+lora`). `trim: global`
under `parameters` is safeedit's own (FusionBench's TIES trim); mergekit ignores keys it does not read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from safeedit.errors import SafeEditError
from safeedit.io import read_yaml_mapping

SUPPORTED = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "linear")
OURS = {"task_arithmetic": "task_arithmetic", "ties": "ties", "dare_linear": "dare", "dare_ties": "dare",
        "linear": "task_arithmetic"}
NORMALIZE = {"task_arithmetic": False, "ties": True, "dare_linear": False, "dare_ties": False, "linear": True}
MODEL_PARAMETERS = {"task_arithmetic": ("weight",), "ties": ("weight", "density"),
                    "dare_linear": ("weight", "density"), "dare_ties": ("weight", "density"), "linear": ("weight",)}
GLOBAL_PARAMETERS = {
    "task_arithmetic": ("weight", "normalize", "lambda", "int8_mask", "rescale"),
    "ties": ("weight", "density", "normalize", "lambda", "int8_mask", "rescale", "trim"),
    "dare_linear": ("weight", "density", "normalize", "lambda", "int8_mask", "rescale"),
    "dare_ties": ("weight", "density", "normalize", "lambda", "int8_mask", "rescale"),
    "linear": ("weight", "normalize"),
}
TOP_LEVEL = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source")
DTYPES = ("float32", "float16", "bfloat16")


def read_mergekit(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """The `kind: merge` scenario fields a mergekit configuration means (`base_model`, `models`, `methods`,
    `dtype`) and notes on what was read differently or not at all; anything else is one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise SafeEditError(f"--config {path}: no such file; give a mergekit YAML configuration")
    raw = read_yaml_mapping(path, "a mergekit configuration is a YAML mapping with merge_method, base_model and "
                                  "models")
    return _Reader(path, raw).read()


class _Reader:
    def __init__(self, path: Path, raw: dict[str, Any]) -> None:
        self.path, self.raw, self.notes = path, raw, []

    def fail(self, where: str, problem: str) -> SafeEditError:
        return SafeEditError(f"{self.path}: {where}: {problem}")

    def read(self) -> tuple[dict[str, Any], list[str]]:
        raw = self.raw
        for key in raw:
            if key in ("slices", "modules"):
                raise self.fail(key, "layer-wise merges are not supported here; list whole models under models:")
            if key not in TOP_LEVEL:
                raise self.fail(key, f"not read here; a configuration has {', '.join(TOP_LEVEL)}")
        method = raw.get("merge_method")
        if method not in SUPPORTED:
            raise self.fail("merge_method", f"{method!r} is not supported; supported: {', '.join(SUPPORTED)} (the "
                            "methods safeedit and mergekit define the same way)")
        if raw.get("tokenizer_source") not in (None, "base"):
            raise self.fail("tokenizer_source", f"{raw['tokenizer_source']!r} is not supported; the merge takes "
                            "the base model's tokenizer (tokenizer_source: base)")
        globals_ = self.parameters(raw.get("parameters"), "parameters", GLOBAL_PARAMETERS[method], method)
        entries = raw.get("models")
        if not isinstance(entries, list) or not entries:
            raise self.fail("models", "give a list of models: [{model: FOLDER, parameters: {weight: 1.0}}]")
        base = raw.get("base_model")
        if base is not None and not isinstance(base, str):
            raise self.fail("base_model", "give a folder or hub id")
        if base is None and method != "linear":
            raise self.fail("base_model", f"{method} merges task vectors against a base model; give base_model")
        models = []
        for index, entry in enumerate(entries):
            models.append(self.model(entry, index, method, globals_))
        if method == "linear":
            base = base or models[0]["model"]
            if not globals_.get("normalize", True):
                raise self.fail("parameters.normalize", "linear with normalize: false (a plain weighted sum) is not "
                                "supported; it is not a merge of task vectors")
            self.notes.append(f"{self.path}: linear is computed as task arithmetic relative to {base} with normalize "
                              "and λ = 1, which is Σ wᵢ θᵢ / Σ wᵢ over the models listed.")
        else:
            kept = [m for m in models if m["model"] != base]
            if len(kept) < len(models):
                self.notes.append(f"{self.path}: the base model listed under models adds no task vector (mergekit "
                                  "skips it too).")
            models = kept
            if not models:
                raise self.fail("models", "every model listed is the base model; list the fine-tunes to merge")
        self.name_tasks(models)
        if globals_.get("int8_mask"):
            self.notes.append(f"{self.path}: int8_mask only sets the dtype of mergekit's sign mask and does not "
                              "change the merge; ignored.")
        dtype = self.dtype("out_dtype") or self.dtype("dtype")
        return {"base_model": base, "models": models, "methods": {OURS[method]: self.options(method, globals_)},
                **({"dtype": dtype} if dtype else {})}, self.notes

    def parameters(self, given: Any, where: str, allowed: tuple[str, ...], method: str) -> dict[str, Any]:
        if given is None:
            return {}
        if not isinstance(given, dict):
            raise self.fail(where, "give a mapping such as {weight: 1.0}")
        values = {}
        for key, value in given.items():
            if key not in allowed:
                raise self.fail(f"{where}.{key}", f"not a parameter of {method} here; it takes "
                                f"{', '.join(allowed)}")
            if isinstance(value, list | dict):
                raise self.fail(f"{where}.{key}", "gradients and filters (lists) are not supported; give one value")
            values[key] = self.checked(key, value, f"{where}.{key}")
        return values

    def checked(self, key: str, value: Any, where: str) -> Any:
        if key in ("normalize", "int8_mask", "rescale"):
            if not isinstance(value, bool):
                raise self.fail(where, f"{value!r} is not true or false")
            return value
        if key == "trim":
            if value not in ("tensor", "global"):
                raise self.fail(where, f"{value!r}: choose tensor (mergekit's, per tensor) or global")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(where, f"{value!r} is not a number")
        if key == "density" and not 0 < value <= 1:
            raise self.fail(where, f"{value} is not in (0, 1]; give the share of each task vector kept, e.g. 0.5")
        if key == "lambda" and value < 0:
            raise self.fail(where, f"{value} is below 0; give the scale of the merged task vector, e.g. 1.0")
        return float(value)

    def model(self, entry: Any, index: int, method: str, globals_: dict[str, Any]) -> dict[str, Any]:
        where = f"models[{index}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise self.fail(where, "give {model: FOLDER, parameters: {weight: 1.0}}")
        unknown = [key for key in entry if key not in ("model", "parameters")]
        if unknown:
            raise self.fail(f"{where}.{unknown[0]}", "not read here; a model has model and parameters")
        if "+" in entry["model"]:
            raise self.fail(f"{where}.model", f"{entry['model']!r}: LoRA references (model+lora) are not supported; "
                            "merge the adapter into its model first (peft's merge_and_unload)")
        own = self.parameters(entry.get("parameters"), f"{where}.parameters", MODEL_PARAMETERS[method], method)
        if "weight" not in own and "weight" not in globals_:
            raise self.fail(where, f"no weight; mergekit requires one per model ({where}.parameters.weight, or "
                            "parameters.weight for all)")
        model = {"model": entry["model"], "weight": own.get("weight", globals_.get("weight"))}
        if "density" in own:
            model["density"] = own["density"]
        return model

    def name_tasks(self, models: list[dict[str, Any]]) -> None:
        """Each task's metric name: its folder's name, numbered where two folders share one."""
        seen: dict[str, int] = {}
        for model in models:
            name = re.sub(r"[^\w.\-]", "_", Path(model["model"].rstrip("/")).name) or "task"
            seen[name] = seen.get(name, 0) + 1
            model["name"] = name if seen[name] == 1 else f"{name}-{seen[name]}"

    def options(self, method: str, globals_: dict[str, Any]) -> dict[str, Any]:
        normalize = globals_.get("normalize", NORMALIZE[method])
        scale = globals_.get("lambda", 1.0)
        if globals_.get("rescale") and method in ("task_arithmetic", "ties"):
            raise self.fail("parameters.rescale", f"true is mergekit's rescaling of dare_*; {method} does not "
                            "rescale here (mergekit's default for it is false)")
        if method in ("task_arithmetic", "linear"):
            return {"scale": 1.0 if method == "linear" else scale, "normalize": normalize}
        density = globals_.get("density", 1.0)
        if method == "ties":
            return {"keep": density, "scale": scale, "normalize": normalize, "trim": globals_.get("trim", "tensor")}
        return {"density": density, "scale": scale, "normalize": normalize,
                "rescale": "l1" if globals_.get("rescale", True) else "none", "sign_election": method == "dare_ties"}

    def dtype(self, key: str) -> str | None:
        value = self.raw.get(key)
        if value is None:
            return None
        name = str(value).removeprefix("torch.")
        if name not in DTYPES:
            raise self.fail(key, f"{value!r} is not supported; give {', '.join(DTYPES)}")
        return name
