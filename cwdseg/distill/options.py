"""Options of a distillation term: default and bounds, declared next to the term's class.

Each term class carries ``OPTIONS: dict[str, Option]``; :func:`check_option` turns a bad value into a
one-line :class:`OptionError` (``option tau must be > 0, got -1``) that a parser can show as is.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class OptionError(ValueError):
    """A bad option value; the message is one line naming the option and the allowed range."""


@dataclass(frozen=True)
class Option:
    """One option: its default (whose type is the option's type), numeric bounds or string choices.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``; ``None`` means unbounded.
    """

    default: Any
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    help: str = ""

    def bounds_text(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts)


def check_option(name: str, option: Option, value: Any) -> Any:
    """``value`` converted to the option's type and checked against its bounds; else :class:`OptionError`."""
    kind = type(option.default)
    if kind is bool:
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered not in ("true", "1", "yes", "false", "0", "no"):
                raise OptionError(f"option {name} must be True or False, got {value!r}")
            value = lowered in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise OptionError(f"option {name} must be True or False, got {value!r}")
        return value
    if kind is str:
        value = str(value)
        if option.choices is not None and value not in option.choices:
            raise OptionError(f"option {name} must be one of {', '.join(option.choices)}, got {value!r}")
        return value
    try:
        number = kind(value) if kind is float else int(str(value)) if isinstance(value, str) else value
    except ValueError:
        raise OptionError(f"option {name} must be {'an integer' if kind is int else 'a number'}, "
                          f"got {value!r}") from None
    if kind is int:
        if isinstance(number, bool) or not isinstance(number, int) and not float(number).is_integer():
            raise OptionError(f"option {name} must be an integer, got {value!r}")
        number = int(number)
    else:
        number = float(number)
        if not math.isfinite(number):
            raise OptionError(f"option {name} must be a finite number, got {value!r}")
    bad_low = option.low is not None and (number <= option.low if option.low_open else number < option.low)
    bad_high = option.high is not None and (number >= option.high if option.high_open else number > option.high)
    if bad_low or bad_high:
        raise OptionError(f"option {name} must be {option.bounds_text()}, got {value!r}")
    return number


def resolve_options(owner: str, options: Mapping[str, Option], given: Mapping[str, Any]) -> dict[str, Any]:
    """Every option of ``options``: the checked given value, else the default. Unknown names are an error."""
    unknown = sorted(set(given) - set(options))
    if unknown:
        raise OptionError(f"{owner}: unknown option {unknown[0]!r}; its options: {', '.join(options) or 'none'}")
    return {name: check_option(name, opt, given[name]) if name in given else opt.default
            for name, opt in options.items()}


def defaults(options: Mapping[str, Option]) -> dict[str, Any]:
    """``{name: default}``: the form :class:`cwdseg.distill.registry.Method` keeps."""
    return {name: opt.default for name, opt in options.items()}
