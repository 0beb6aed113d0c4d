"""The one base of every validated configuration: unknown keys are errors, so a typo is reported, not ignored; and
the number types every configuration shares, checked where the input arrives."""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# Seeds feed torch, numpy and Python's random alike; numpy takes 0 ... 2**32 - 1.
SEED_LIMIT = 2**32
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT, description="a seed, 0 to 2**32 - 1")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
