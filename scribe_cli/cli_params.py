"""Plain string, flag, number and path parameters without pydantic: ~100 ms less start-up.

typer 0.29 checks each parameter's value with a pydantic ``TypeAdapter``, built on
first use, even for ``--help`` when it is not given; importing pydantic and building
the adapters was ~100 ms of a read-only command's ~300 and ~70 ms of every ``watch``,
``resume`` and ``export`` (issue 16; pydantic's own import time: pydantic/pydantic#7409).
``ScribeTyper``'s commands give such parameters a check that returns, without pydantic,
exactly what typer's adapter returns:

* a ``str`` or ``bool`` value (from the command line or the environment): the value as it
  is (typer's ``_parse_cli_str``/``_parse_cli_bool``, then pydantic's lax ``str``/``bool``,
  give it back unchanged);
* an ``int`` or ``float`` parameter's value already of its type (its default, say) and
  inside its bounds (``min``/``max``): the value; typed as plain decimal digits
  (``--settle 2``, ``--window 8``, ``--give-up-after 5.5``): ``int()``/``float()`` of it,
  as pydantic's lax mode reads it, when inside the bounds;
* a ``Path`` given as a non-empty string: typer's own path check (``coerce_cli_path``:
  exists, file or folder, readable...) of ``Path(value)``, which is what pydantic's
  ``Path`` adapter makes of the string.

Anything else (bytes, a flag given as a string, a number written otherwise or out of its
bounds, which typer refuses or clamps, every other type) goes through typer's own adapter:
values, errors and help stay typer's.

This leans on internals of typer (``_TyperParameter._runtime_param``,
``typer._coercion.RuntimeParam``, ``typer._param_types.coerce_cli_path``; typer is pinned
below 0.30); when they change, nothing breaks: parameters keep typer's own checks and only
start-up gets slower again, which tests/test_startup.py catches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

try:
    from typer._coercion import RuntimeParam, build_runtime_param
    from typer._param_types import coerce_cli_path
except ImportError:  # another typer: it keeps its own checks
    RuntimeParam = None

PLAIN_TYPES = (str, bool, int, float, Path)
#: how a number typed on the command line looks when int()/float() read it as pydantic does
DIGITS = {int: re.compile(r"-?[0-9]+"), float: re.compile(r"-?[0-9]+(?:\.[0-9]+)?")}


class _PlainParams:
    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            plain(param)
        return params


class ScribeCommand(_PlainParams, TyperCommand):
    """typer's command, whose plain ``str``/``bool``/number parameters (``--help`` included) skip pydantic."""


class ScribeGroup(_PlainParams, TyperGroup):
    """typer's group, whose plain ``str``/``bool``/number parameters (``--help`` included) skip pydantic."""


class ScribeTyper(typer.Typer):
    """``typer.Typer`` making ``ScribeGroup`` and ``ScribeCommand``s unless told otherwise."""

    def __init__(self, *args: Any, cls: Any = None, **kwargs: Any):
        super().__init__(*args, cls=cls or ScribeGroup, **kwargs)

    def command(self, *args: Any, cls: Any = None, **kwargs: Any):
        return super().command(*args, cls=cls or ScribeCommand, **kwargs)


def plain(param) -> None:
    """Give ``param`` the pass-through check when it is a plain ``str``, ``bool``, number or ``Path`` (once)."""
    descriptor = getattr(param, "type_descriptor", None)
    if (RuntimeParam is None or descriptor is None or getattr(param, "_runtime_param", False) is not None
            or descriptor.annotation not in PLAIN_TYPES or descriptor.file_annotation is not None
            or descriptor.parameter_info.parser is not None
            or descriptor.parameter_info.path_type not in (None, Path)):
        return
    param._runtime_param = _Plain(annotation=descriptor.annotation, parameter_info=descriptor.parameter_info)


def _within(value: int | float, info) -> bool:
    """Whether a number is inside the parameter's bounds (``min``/``max``), where typer's check
    returns it as it is; outside them typer's check refuses or clamps it."""
    low, high = getattr(info, "min", None), getattr(info, "max", None)
    return (low is None or value >= low) and (high is None or value <= high)


if RuntimeParam is not None:

    @dataclass(frozen=True)
    class _Plain(RuntimeParam):
        """A value already of the parameter's type, returned as it is; anything else: typer's own check."""

        def _coerce_value(self, value: Any, param, ctx) -> Any:
            annotation = self.annotation
            if annotation is Path:
                if isinstance(value, Path) or (type(value) is str and value):
                    return coerce_cli_path(Path(value), self.parameter_info, path_type=Path, param=param, ctx=ctx)
            elif type(value) is annotation:
                if annotation in DIGITS and not _within(value, self.parameter_info):
                    return build_runtime_param(param.type_descriptor)._coerce_value(value, param=param, ctx=ctx)
                return value
            elif type(value) is str and annotation in DIGITS and DIGITS[annotation].fullmatch(value):
                number = annotation(value)
                if _within(number, self.parameter_info):
                    return number
            return build_runtime_param(param.type_descriptor)._coerce_value(value, param=param, ctx=ctx)
