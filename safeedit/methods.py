"""The method contract: every edit a scenario can name is one registered, typed function.

    @register_method("merge", summary="DARE: drop and rescale each task vector, then task arithmetic",
                     limitations="...", paper="Yu et al., ICML 2024")
    def dare(setting: MergeSetting, options: DareOptions, seed: int, progress: bool) -> EditResult:
        ...

A method takes what its kind's runner hands every method of that kind (the task or setting), its options, the
run's seed and whether to show progress, and returns an `EditResult`. The annotation of `options` is a pydantic
model: the method's validated configuration, so an unknown or misspelt option fails when the scenario loads,
naming the field. The name is the function's own (or `name=`); the kind, a one-line summary, the limitations in
plain words (for the compliance report) and the paper travel with it.

Language-model methods are an objective × mask pair named `<objective>+<mask score>` (`npo+wagle`,
`graddiff+random`): the objective is registered here, the mask is any registered attribution score, and
`resolve` parses the pair, once, for every caller.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pydantic
import torch
from torch import nn

from safeedit.errors import SafeEditError, first_problem
from safeedit.masks import Mask

# Kinds of method, each with the module that registers its core methods. On first use the rest of that module's
# package is imported too, so a new method is one new file in `safeedit/<package>/` (plus its test), registered
# wherever it is looked up, whatever happened to be imported before.
KIND_MODULES = {"classification": "safeedit.unlearn.methods", "generation": "safeedit.unlearn.diffusion",
                "llm-unlearning": "safeedit.unlearn.wagle", "pruning": "safeedit.prune.antidote",
                "merge": "safeedit.merge.methods"}
KINDS = tuple(KIND_MODULES)


@dataclass
class EditResult:
    """What every method returns: the edited model (an `nn.Module`, or the kind's wrapper such as a
    `DiffusionModel`; for merges the merged parameters instead; neither for reference rows that edit nothing), its
    masks by name, and details worth recording (coefficients, counts)."""

    model: nn.Module | Any = None
    parameters: dict[str, torch.Tensor] | None = None
    masks: dict[str, Mask] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def mask(self) -> Mask | None:
        """The method's one mask, if it has exactly one."""
        return next(iter(self.masks.values())) if len(self.masks) == 1 else None


@dataclass(frozen=True)
class MethodSpec:
    kind: str
    name: str
    function: Callable[..., EditResult]
    options: type[pydantic.BaseModel]
    summary: str
    limitations: str
    paper: str | None = None
    mask_scores: tuple[str, ...] | None = None  # the scores `<name>+<score>` may name; None: every attribution score

    def validate(self, given: Mapping[str, Any] | None, where: str = "") -> pydantic.BaseModel:
        """The method's options from `given` (a scenario's mapping); a bad key or value is one line naming it."""
        try:
            return self.options(**dict(given or {}))
        except pydantic.ValidationError as error:
            prefix = f"{where}: " if where else ""
            raise SafeEditError(f"{prefix}methods.{self.name}: {first_problem(error)}") from None

    def run(self, setting: Any, options: pydantic.BaseModel, seed: int = 0, progress: bool = True) -> EditResult:
        return self.function(setting, options, seed, progress)

    @property
    def about(self) -> dict[str, str]:
        """The record's `about` entry: what the method does and what its evidence does not show."""
        return {"summary": self.summary, "limitations": self.limitations}


REGISTRY: dict[str, dict[str, MethodSpec]] = {kind: {} for kind in KINDS}


def register_method(kind: str, *, summary: str, limitations: str, paper: str | None = None,
                    name: str | None = None, mask_scores: tuple[str, ...] | None = None,
                    ) -> Callable[[Callable[..., EditResult]], Callable[..., EditResult]]:
    """Register a method of `kind` (see the module docstring for the signature it must have)."""
    if kind not in REGISTRY:
        raise ValueError(f"unknown method kind {kind!r}; one of {', '.join(KINDS)}")

    def decorate(function: Callable[..., EditResult]) -> Callable[..., EditResult]:
        parameters = list(inspect.signature(function).parameters)
        if len(parameters) != 4:
            raise TypeError(f"method {function.__name__} must take (setting, options, seed, progress)")
        options = typing.get_type_hints(function).get(parameters[1])
        if not (isinstance(options, type) and issubclass(options, pydantic.BaseModel)):
            raise TypeError(f"method {function.__name__}: annotate its options with a pydantic model")
        registered = name or function.__name__
        REGISTRY[kind][registered] = MethodSpec(kind, registered, function, options, summary, limitations, paper,
                                               mask_scores)
        return function

    return decorate


def methods(kind: str) -> dict[str, MethodSpec]:
    """The registered methods of `kind`, by name, in registration order."""
    _load(kind)
    return REGISTRY[kind]


@functools.cache
def _load(kind: str) -> None:
    module = importlib.import_module(KIND_MODULES[kind])
    package = module.__name__.rpartition(".")[0]
    for found in pkgutil.iter_modules(importlib.import_module(package).__path__, f"{package}."):
        importlib.import_module(found.name)


def get_method(kind: str, name: str) -> MethodSpec:
    if name not in methods(kind):
        raise SafeEditError(f"unknown method {name!r}; choose from {', '.join(REGISTRY[kind])}")
    return REGISTRY[kind][name]


@dataclass(frozen=True)
class Resolved:
    """A method name as a scenario writes it: the registered method and, for `<objective>+<mask>`, the mask score."""

    spec: MethodSpec
    mask_score: str | None = None


def resolve(kind: str, name: str) -> Resolved:
    """`name` of `kind`, parsed once: `npo+wagle` is the objective `npo` confined to a `wagle` mask."""
    from safeedit.attribution import SCORES

    base, plus, mask_score = name.partition("+")
    spec = get_method(kind, base)
    allowed = spec.mask_scores or tuple(sorted(SCORES))
    if plus and not mask_score:
        raise SafeEditError(f"method {name!r}: name a mask score after '+', one of {', '.join(allowed)}")
    if mask_score and mask_score not in allowed:
        raise SafeEditError(f"method {name!r}: unknown mask score {mask_score!r}; one of {', '.join(allowed)}")
    return Resolved(spec, mask_score or None)


def check_mask_score(name: str | None) -> str | None:
    """A pydantic validator for options that name a mask score: an unknown score fails when the scenario loads."""
    from safeedit.attribution import SCORES

    if name is not None and name not in SCORES:
        raise ValueError(f"unknown score {name!r}; one of {', '.join(sorted(SCORES))}")
    return name
