"""A classifier's reference, as a scenario states it: the model trained without the forget data that every method
is measured against (gap to retrain, time vs retrain), checked before anything loads.

    reference: {from: BASE, epochs: 3, lr: 2.0e-5}   the checkpoint the model was fine-tuned from (a save_pretrained
                                                      folder or hub id), fine-tuned here on the retain rows
    reference: {from: scratch}                        the model's architecture from a seeded random initialisation,
                                                      trained here on the retain rows (embedded models' default)
    reference: {model: PATH}                          a model the user already trained without the forget data
    reference: none                                   no reference (null too); the comparisons with it are left out

`retrain:` is the older spelling of `reference: {from: scratch, ...}` (`retrain: null`: `reference: none`), still
accepted and recorded as stated; giving both is an error. The recipe (epochs, lr, batch_size, weight_decay) is the
section's, else `model.recipe`, else an embedded model's own; the reference's seed is the scenario's seed plus
`seed_offset`. Unstated, an embedded model (or one with `model.recipe`, as before this section existed) is
retrained from scratch; any other model stops here with the three choices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import ConfigDict, Field

from safeedit.config import Strict
from safeedit.errors import first_problem
from safeedit.models.zoo import EMBEDDED_MODELS
from safeedit.unlearn.methods import RetrainOptions

SCRATCH = "scratch"  # `from: scratch`: no base checkpoint, the architecture's own initialisation

# The record's names for what the reference is (record.reference.kind).
FROM_SCRATCH, FROM_BASE, GIVEN, NONE = "retrained-from-scratch", "fine-tuned-from-base", "given", "none"

_CHOICES = ("reference: {from: BASE, epochs: N, lr: X} (the checkpoint it was fine-tuned from, fine-tuned here on "
            "the retain rows), reference: {model: PATH} (a model you trained without the forget data), or "
            "reference: none")


class TrainedReference(RetrainOptions):
    """A reference trained here on the retain rows only, from `scratch` or from a base checkpoint."""

    model_config = ConfigDict(extra="forbid", serialize_by_alias=True)
    start: str = Field(alias="from", min_length=1, description="scratch, or the save_pretrained folder or hub id of "
                                                               "the checkpoint the model was fine-tuned from")


class GivenReference(Strict):
    """A model the user already trained without the forget data: loaded, evaluated and hashed, never trained."""

    model: str = Field(min_length=1, description="its save_pretrained folder or hub id (embedded models: a "
                                                 "safetensors file of the same architecture)")


ReferenceSection = TrainedReference | GivenReference | Literal["none"]


@dataclass(frozen=True)
class ReferencePlan:
    """What the run does for its reference: `kind` (FROM_SCRATCH, FROM_BASE, GIVEN, NONE), the base checkpoint or
    given model (`source`), and for the trained kinds the resolved recipe (`options`: nothing left None)."""

    kind: str
    source: str | None = None
    options: RetrainOptions | None = None

    def recipe(self) -> dict[str, Any] | None:
        """The training recipe as the record states it (None for a given reference or none)."""
        if self.options is None:
            return None
        return {**self.options.model_dump(exclude={"seed_offset"}), "optimizer": "AdamW"}


def stated_reference(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` (a classification scenario mapping) with its `reference:` parsed into a section; `retrain:` beside it,
    or a section that cannot be one, is a one-line ValueError naming the field and the fix."""
    if "retrain" in raw and "reference" in raw:
        raise ValueError("give reference: only; retrain: is its older name (retrain: {...} is reference: {from: "
                         "scratch, ...}, retrain: null is reference: none)")
    return {**raw, "reference": parse_reference(raw["reference"])} if "reference" in raw else raw


def from_retrain(retrain: RetrainOptions | None) -> ReferenceSection:
    """The section an older `retrain:` states: its options from scratch, or none for null."""
    if retrain is None:
        return NONE
    return TrainedReference.model_validate({"from": SCRATCH, **retrain.model_dump()})


def parse_reference(value: Any) -> ReferenceSection:
    """A stated `reference:` as its section (`none` and null are both no reference)."""
    if value is None or value == NONE:
        return NONE
    if not isinstance(value, dict):
        example = value if isinstance(value, str) else "PATH"
        raise ValueError(f"reference: {value!r} is not understood; write reference: {{model: {example}}} for a model "
                         f"trained without the forget data, reference: {{from: {example}, epochs: N, lr: X}} to "
                         "fine-tune a base on the retain rows, or reference: none")
    if "from" in value and "model" in value:
        raise ValueError("reference: give from: (a base fine-tuned here on the retain rows) or model: (a model "
                         "already trained without the forget data), not both")
    if "model" in value:
        recipe = sorted(set(value) - {"model"})
        if recipe:
            raise ValueError(f"reference.{recipe[0]}: a given model: is already trained, so it takes no recipe; "
                             "recipe fields go with from: BASE")
        return _validated(GivenReference, value, "reference")
    if "from" in value:
        return _validated(TrainedReference, value, "reference")
    raise ValueError(f"reference: say where the reference comes from: {_CHOICES}")


def _validated(section: type[pydantic.BaseModel], value: dict[str, Any], where: str) -> Any:
    try:
        return section.model_validate(value)
    except pydantic.ValidationError as error:
        raise ValueError(f"{where}.{first_problem(error)}") from None


def plan_reference(section: ReferenceSection | None, model_name: str,
                   model_recipe: dict[str, Any] | None) -> ReferencePlan:
    """The reference a scenario asks for, resolved and checked without loading anything: the recipe is complete,
    a named folder or file exists, and an embedded model is not given a base checkpoint."""
    embedded = EMBEDDED_MODELS.get(model_name)
    if section == NONE:
        return ReferencePlan(NONE)
    if section is None:
        if embedded is None and model_recipe is None:
            raise ValueError(f"model {model_name} is not embedded, so say what it is compared with: {_CHOICES}")
        section = TrainedReference.model_validate({"from": SCRATCH})  # as before this section existed
    if isinstance(section, GivenReference):
        _check_source(section.model, "reference.model", embedded is not None,
                      "a model you trained without the forget data")
        return ReferencePlan(GIVEN, section.model)
    from_base = section.start != SCRATCH
    if from_base and embedded is not None:
        raise ValueError(f"reference.from: embedded model {model_name} has no base checkpoint; use reference: "
                         "{from: scratch} (its default) or reference: {model: FILE.safetensors}")
    if from_base:
        _check_source(section.start, "reference.from", False, "the checkpoint the model was fine-tuned from")
    recipe = model_recipe or ({"epochs": embedded.epochs, "lr": embedded.lr, "batch_size": embedded.batch_size}
                              if embedded else {})
    epochs, lr = section.epochs or recipe.get("epochs"), section.lr or recipe.get("lr")
    if epochs is None or lr is None:
        what = f"fine-tuning {section.start}" if from_base else f"retraining {model_name} from scratch"
        hint = "" if from_base else "; a fine-tuned model is better compared with reference: {from: BASE, ...}"
        raise ValueError(f"reference: {what} needs a recipe; set reference.epochs and reference.lr (or "
                         f"model.recipe){hint}")
    options = RetrainOptions(epochs=epochs, lr=lr, batch_size=section.batch_size or recipe.get("batch_size", 64),
                             weight_decay=section.weight_decay, seed_offset=section.seed_offset)
    return ReferencePlan(FROM_BASE if from_base else FROM_SCRATCH, section.start if from_base else None, options)


# A hub id: `name` or `owner/name` (letters, digits, - _ .), never a path that starts with . or /.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?")


def _check_source(spec: str, field: str, embedded: bool, what: str) -> None:
    """A named reference or base exists: embedded models take a safetensors file; other models a folder with
    config.json, or a hub id (checked when its configuration is read, before the model loads)."""
    path = Path(spec)
    if embedded:
        if not path.is_file():
            raise ValueError(f"{field}: {spec}: no such file; for an embedded model give a safetensors file of its "
                             f"architecture: {what}")
        return
    if path.is_file():
        raise ValueError(f"{field}: {spec} is a file; a bare weights file has no architecture: give the "
                         f"save_pretrained folder of {what}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{field}: {spec} has no config.json; save {what} with save_pretrained() first")
        return
    if not _HUB_ID.fullmatch(spec):
        raise ValueError(f"{field}: {spec}: no such folder; give the save_pretrained folder (or hub id) of {what}")
