"""The score registry: a score is one typed function, and its signature is its configuration.

A score function takes the selected weights first, then the streaming statistics it needs (declared by an
`Annotated[..., Statistic(role)]` type), then its options with defaults. `register_score` reads the signature:
the statistics tell the driver which data roles to stream and what to accumulate; the options become a pydantic
model that validates what a user or a scenario passes, naming the bad key or value.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pydantic

from safeedit.attribution.statistics import Statistic, Tensors
from safeedit.errors import SafeEditError

ScoreFunction = Callable[..., Tensors]


@dataclass(frozen=True)
class ScoreSpec:
    name: str
    function: ScoreFunction
    statistics: dict[str, Statistic]  # argument name -> statistic
    options: type[pydantic.BaseModel]
    summary: str

    @property
    def roles(self) -> tuple[str, ...]:
        """Data roles this score streams, in first-use order."""
        return tuple(dict.fromkeys(stat.role for stat in self.statistics.values()))

    def validate_options(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        try:
            return self.options(**dict(options or {})).model_dump()
        except pydantic.ValidationError as error:
            problem = error.errors()[0]
            where = ".".join(str(part) for part in problem["loc"]) or "options"
            allowed = ", ".join(self.options.model_fields) or "none"
            raise SafeEditError(
                f"score '{self.name}': option {where!r}: {problem['msg']} (options it takes: {allowed})"
            ) from None


SCORES: dict[str, ScoreSpec] = {}


def register_score(function: ScoreFunction) -> ScoreFunction:
    """Register `function` under its own name as a score (see the module docstring for the signature)."""
    hints = typing.get_type_hints(function, include_extras=True)
    parameters = list(inspect.signature(function).parameters.values())
    statistics: dict[str, Statistic] = {}
    option_fields: dict[str, Any] = {}
    for parameter in parameters[1:]:  # the first argument is always the weights
        metadata = getattr(hints.get(parameter.name), "__metadata__", ())
        stat = next((m for m in metadata if isinstance(m, Statistic)), None)
        if stat is not None:
            statistics[parameter.name] = stat
        elif parameter.default is inspect.Parameter.empty:
            raise TypeError(f"score option {parameter.name!r} of {function.__name__} needs a default")
        else:
            option_fields[parameter.name] = (hints.get(parameter.name, Any), parameter.default)
    options = pydantic.create_model(
        f"{function.__name__}_options", __config__=pydantic.ConfigDict(extra="forbid", strict=False), **option_fields
    )
    summary = (function.__doc__ or "").strip().splitlines()[0] if function.__doc__ else ""
    SCORES[function.__name__] = ScoreSpec(function.__name__, function, statistics, options, summary)
    return function


def get_score(name: str) -> ScoreSpec:
    if name not in SCORES:
        raise SafeEditError(f"unknown score {name!r}; choose one of: {', '.join(sorted(SCORES))}")
    return SCORES[name]
