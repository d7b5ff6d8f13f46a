"""The base of every config model: what "strict" means for a key in a config file."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, model_validator


def _admits_bool(annotation: Any) -> bool:
    """``bool`` itself, or a union with ``bool`` among its members (``bool | Literal["all"]``)."""
    return annotation is bool or bool in get_args(annotation)


class StrictModel(BaseModel):
    """Unknown keys are errors, models are frozen, every float must be finite (an infinite lr,
    temperature or potential parameter is a mistake), and a yes/no value is refused where a number
    or text belongs (pydantic would read ``true`` as 1: in a config that is a slip, not a value)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_yes_no_for_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key)
                if isinstance(value, bool) and field is not None and not _admits_bool(field.annotation):
                    raise ValueError(f"{key}: a yes/no value where a number or text belongs, got {value}")
        return data
