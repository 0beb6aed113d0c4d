"""The one base of every validated configuration: unknown keys are errors, so a typo is reported, not ignored."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
