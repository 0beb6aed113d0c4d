"""The one base of every validated configuration: unknown keys are errors, so a typo is reported, not ignored; and
the number types every configuration shares, checked where the input arrives."""

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

# Seeds feed torch, numpy and Python's random alike; numpy takes 0 ... 2**32 - 1.
SEED_LIMIT = 2**32
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT, description="a seed, 0 to 2**32 - 1")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def stated(data: dict[str, Any], model: BaseModel, later: tuple[str, ...]) -> dict[str, Any]:
    """`data` (a model's dump) without the options in `later` that hold their defaults: options added after records
    were written stay out of a record unless set, so earlier records keep their shape."""
    fields = type(model).model_fields
    return {key: value for key, value in data.items() if key not in later or value != fields[key].default}
