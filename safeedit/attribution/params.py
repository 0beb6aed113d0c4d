"""Which parameters an attribution pass looks at: chosen by regular expressions over parameter names."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from safeedit.errors import SafeEditError


def select_parameters(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> dict[str, nn.Parameter]:
    """Floating-point parameters whose name matches any `include` pattern and no `exclude` pattern.

    Patterns are Python regular expressions searched anywhere in the name (``"attn"``, ``r"layers\\.[0-3]\\."``,
    ``r"\\.weight$"``). With no `include`, every floating-point parameter is selected. Shared (tied) parameters
    appear once, under their first name.
    """
    include = [include] if isinstance(include, str) else list(include or [])
    exclude = [exclude] if isinstance(exclude, str) else list(exclude or [])
    compiled = []
    for pattern in [*include, *exclude]:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise SafeEditError(f"parameter pattern {pattern!r} is not a valid regular expression: {error}") from None
    include_re, exclude_re = compiled[: len(include)], compiled[len(include) :]

    named = dict(model.named_parameters())  # deduplicates tied parameters
    if not named:
        raise SafeEditError(f"{type(model).__name__} has no parameters to attribute")
    selected = {
        name: param
        for name, param in named.items()
        if torch.is_floating_point(param)
        and (not include_re or any(r.search(name) for r in include_re))
        and not any(r.search(name) for r in exclude_re)
    }
    if not selected:
        example = ", ".join(list(named)[:4])
        raise SafeEditError(
            f"parameter patterns include={include} exclude={exclude} match no parameter; names look like: {example}"
        )
    return selected
