"""Each run option declared once: a dataclass field carries its help, its rule and its CLI form as metadata.

From that one declaration come the command-line options (:func:`add_options`), the validation with its one-line
errors (:func:`check_fields`), and the reading and writing of configuration files (:func:`read_file`,
:func:`config_text`). Configuration files are YAML, read with PyYAML's safe loader: JSON is YAML, so a run's own
``config.json`` is a configuration file too, and YAML has ``null`` for the options left at "auto" (TOML has none).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

from .errors import ConfigError


class Rule(NamedTuple):
    """What a field accepts: a predicate, the words of its error (``an integer >= 1``), argparse's choices."""

    ok: Callable[[Any], bool]
    expected: str
    choices: tuple | None = None


def _number_ok(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer_ok(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _maybe(ok: Callable[[Any], bool], none: bool) -> Callable[[Any], bool]:
    return (lambda v: v is None or ok(v)) if none else ok


def integer(low: int, *, none: bool = False, even: bool = False, note: str = "") -> Rule:
    """An integer >= ``low`` (``even``: and even), or None where ``none``."""
    ok = lambda v: _integer_ok(v) and v >= low and (not even or v % 2 == 0)  # noqa: E731
    return Rule(_maybe(ok, none), f"an {'even ' if even else ''}integer >= {low}{note}")


def number(interval: str, note: str = "") -> Rule:
    """A finite number in ``interval``: ``"> 0"``, ``">= 0"`` or ``"[0, 1)"`` (brackets say which ends count)."""
    m = re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", interval)
    if m:
        lo, hi = float(m[2]), float(m[3])
        ok = lambda v: ((v >= lo) if m[1] == "[" else (v > lo)) and ((v <= hi) if m[4] == "]" else (v < hi))  # noqa
        text = f"in {interval}"
    else:
        op, bound = interval.split()
        ok = (lambda v: v > float(bound)) if op == ">" else (lambda v: v >= float(bound))
        text = interval
    return Rule(lambda v: _number_ok(v) and ok(v), f"a finite number {text}{note}")


def one_of(*values: Any, none: bool = False) -> Rule:
    """One of ``values`` (argparse offers them as choices)."""
    names = [str(v) for v in values]
    words = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
    return Rule(_maybe(lambda v: v in values and not isinstance(v, bool), none), words, values)


def boolean(none: bool = False) -> Rule:
    return Rule(_maybe(lambda v: isinstance(v, bool), none), "true or false")


def text(none: bool = False) -> Rule:
    return Rule(_maybe(lambda v: isinstance(v, str) and v != "", none), "a non-empty string")


@dataclass(frozen=True)
class Option:
    """How one configuration field appears on the command line and what it accepts.

    ``flags``: the option strings (default ``--field-name``); ``action``: ``"flag"`` (``--x`` sets true),
    ``"toggle"`` (``--x`` / ``--no-x``), ``"off"`` (the flag sets false), ``"append"`` (repeatable, comma-joined),
    or None for a value (argparse offers the values of a :func:`one_of` rule as choices)."""

    help: str
    rule: Rule
    group: str
    flags: tuple[str, ...] = ()
    action: str | None = None
    metavar: str | None = None

    def __call__(self, default: Any) -> Any:
        """The dataclass field of this option, with ``default``."""
        return dataclasses.field(default=default, metadata={"option": self})


def opt(default: Any, help: str, rule: Rule, group: str, **kw: Any) -> Any:
    """A field declared in place: ``lr: float = opt(0.025, "help", number("> 0"), "optimisation")``."""
    return Option(help, rule, group, **kw)(default)


def options_of(cls: type) -> dict[str, Option]:
    """Field name -> its :class:`Option`, in declaration order."""
    return {f.name: f.metadata["option"] for f in dataclasses.fields(cls)}


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_fields(cfg: Any) -> None:
    """Apply every field's rule; a ConfigError names the first bad option."""
    for name, option in options_of(type(cfg)).items():
        value = getattr(cfg, name)
        if not option.rule.ok(value):
            raise ConfigError(f"{flag_of(name)} must be {option.rule.expected}, got {value!r}")


def _value_type(field: dataclasses.Field) -> Callable[[str], Any]:
    annotation = str(field.type)
    return int if "int" in annotation else float if "float" in annotation else str


def add_options(parser: argparse.ArgumentParser, cls: type, names: list[str] | None = None) -> None:
    """Add the options of ``cls`` (or of ``names`` only) to ``parser``, each in its group. Every default is None:
    an option not given leaves the preset's (or the file's) value."""
    groups: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if names is not None and field.name not in names:
            continue
        option: Option = field.metadata["option"]
        g = groups.get(option.group) or groups.setdefault(option.group, parser.add_argument_group(option.group))
        flags = option.flags or (flag_of(field.name),)
        kw: dict[str, Any] = dict(dest=field.name, default=None, help=option.help)
        if option.action == "flag":
            kw["action"] = "store_true"
        elif option.action == "off":
            kw["action"] = "store_false"
        elif option.action == "toggle":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _value_type(field)
            kw["metavar"] = option.metavar
            if option.action == "append":
                kw["action"] = "append"
            if "tuple" in str(field.type):
                kw["nargs"] = 2
            kw["choices"] = option.rule.choices
        g.add_argument(*flags, **kw)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of ``cls`` given on the command line (repeated ones comma-joined)."""
    out = {}
    for name, option in options_of(cls).items():
        value = getattr(args, name, None)
        if value is not None:
            out[name] = ",".join(value) if option.action == "append" else value
    return out


def read_file(path: str | Path, cls: type, run_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings in a YAML (or JSON) configuration file: fields of ``cls`` and the ``run_keys`` (such as
    ``preset``). An unreadable file, one that is not a mapping, or an unknown key is a one-line ConfigError."""
    import yaml

    path = Path(path)
    try:
        content = path.read_text()
        data = json.loads(content) if path.suffix == ".json" else yaml.safe_load(content)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot read the configuration file {path}: {reason}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"the configuration file {path} must hold a mapping of option: value")
    unknown = sorted(set(data) - set(options_of(cls)) - set(run_keys))
    if unknown:
        raise ConfigError(f"{path}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                          f"(see --help; the keys are the long options with _ for -)")
    return data


def config_text(config: dict[str, Any]) -> str:
    """``config`` as a YAML configuration file (what ``--print-config`` writes and ``--config`` reads)."""
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=False)
