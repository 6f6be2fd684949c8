"""Probe settings, declared by each probe next to its code.

A probe lists its ``Setting``s; the command line gets ``--<probe>-<name>`` for each (``_`` -> ``-``),
validation happens here before anything is loaded, and the probe receives the values as keyword
arguments. Adding a probe or a setting never touches ``agent/``.
"""

from __future__ import annotations

from dataclasses import dataclass


class SettingError(ValueError):
    """A probe setting is out of range; the message names the flag."""


@dataclass(frozen=True)
class Setting:
    name: str  # keyword argument of the probe's constructor
    default: int
    help: str  # what it bounds and what one unit costs
    minimum: int = 1
    maximum: int = 1 << 30
    power_of_two: bool = False

    def flag(self, probe: str) -> str:
        return f"--{probe}-{self.name.replace('_', '-')}"

    def validate(self, probe: str, value: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingError(f"{self.flag(probe)}: expected a whole number, got {value!r}")
        if not self.minimum <= value <= self.maximum:
            raise SettingError(f"{self.flag(probe)} {value}: must be within {self.minimum}-{self.maximum}")
        if self.power_of_two and value & (value - 1):
            raise SettingError(f"{self.flag(probe)} {value}: must be a power of two")
        return value
