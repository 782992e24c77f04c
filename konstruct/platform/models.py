"""The base of every payload model: unknown fields are errors."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown fields are errors: a typo in an input must not pass silently."""

    model_config = ConfigDict(extra="forbid")
