"""The base of every config section. Methods define their own sections (tunelab/methods/*), so this lives
apart from tunelab/config.py, which imports the methods."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A block of the run config. Unknown keys are errors; `make_read_only()` makes it (and its sub-sections)
    read-only: the resolved config of a run is final."""

    # coerce numbers: YAML reads `run_name: 2024` as an int, which is still a fine name
    # no inf/nan: `lr: .inf` is never meant
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True, allow_inf_nan=False)

    def __setattr__(self, name, value):
        if (self.__pydantic_private__ or {}).get("_frozen"):
            raise TypeError(f"the resolved config is read-only (tried to set '{name}'): derive a new one instead")
        super().__setattr__(name, value)

    def make_read_only(self):
        """Make this section and every section inside it read-only; returns self."""
        for value in self.__dict__.values():
            if isinstance(value, Section):
                value.make_read_only()
        if self.__pydantic_private__ is None:
            object.__setattr__(self, "__pydantic_private__", {})
        self.__pydantic_private__["_frozen"] = True
        return self

    @property
    def read_only(self) -> bool:
        return bool((self.__pydantic_private__ or {}).get("_frozen"))


def positive_values(patterns: dict, what: str) -> dict:
    """Validate a pattern -> number mapping whose numbers must all be > 0."""
    for pattern, value in patterns.items():
        if value <= 0:
            raise ValueError(f"{what} for '{pattern}' must be > 0, got {value}")
    return patterns
