"""Plain string, flag and number parameters without pydantic: ~100 ms less start-up for every command.

typer 0.29 checks each parameter's value with a pydantic ``TypeAdapter``, built
on first use, even for ``--help`` when it is not given; importing pydantic and
building the adapters was ~100 ms of a read-only command's ~300 (issue 16;
pydantic's own import time: pydantic/pydantic#7409).  What those adapters do to
a ``str`` value from the command line or the environment (typer's
``_parse_cli_str``, then pydantic's lax ``str``) and to a ``bool`` value (typer's
``_parse_cli_bool``, then pydantic's lax ``bool``) gives back the value as it
is, so ``ScribeTyper``'s commands hand such parameters a check that returns it.  The
same holds for an ``int`` or ``float`` parameter without bounds (``min``/``max``/
``clamp``) whose value is already of that type: its default, as with ``scribe resume``
(``--window``, ``--give-up-after``), whose start-up lost ~70 ms.  Any other value
(bytes, a string for a flag or a number, as typed on the command line, every other
type: paths, bounded numbers) still goes through typer's own adapter: values, errors
and help are typer's.

This leans on two internals of typer (``_TyperParameter._runtime_param`` and
``typer._coercion.RuntimeParam``); when they change, nothing breaks: parameters
keep typer's own checks and only start-up gets slower again, which
tests/test_startup.py catches (it fails when ``scribe pending`` imports pydantic).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

try:
    from typer._coercion import RuntimeParam, build_runtime_param
except ImportError:  # another typer: it keeps its own checks
    RuntimeParam = None

PLAIN_TYPES = (str, bool, int, float)


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
    """Give ``param`` the pass-through check when it is a plain ``str`` or ``bool`` (once)."""
    descriptor = getattr(param, "type_descriptor", None)
    if (RuntimeParam is None or descriptor is None or getattr(param, "_runtime_param", False) is not None
            or descriptor.annotation not in PLAIN_TYPES or descriptor.file_annotation is not None
            or descriptor.parameter_info.parser is not None or _bounded(descriptor.parameter_info)):
        return
    param._runtime_param = _Plain(annotation=descriptor.annotation, parameter_info=descriptor.parameter_info)


def _bounded(info) -> bool:
    """Whether a number parameter has bounds, which typer's own check enforces."""
    return any(getattr(info, name, None) not in (None, False) for name in ("min", "max", "clamp"))


if RuntimeParam is not None:

    @dataclass(frozen=True)
    class _Plain(RuntimeParam):
        """A value already of the parameter's type, returned as it is; anything else: typer's own check."""

        def _coerce_value(self, value: Any, param, ctx) -> Any:
            if type(value) is self.annotation:
                return value
            return build_runtime_param(param.type_descriptor)._coerce_value(value, param=param, ctx=ctx)
