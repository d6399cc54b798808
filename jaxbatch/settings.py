"""Settings declared once: a dataclass field carries its help text and its
valid values, and both the command line's flags and the library's checks
follow from it.

    @dataclasses.dataclass
    class Config:
        batch_size: int = setting(32, "examples per step", at_least=1)
        lr: float = setting(0.05, "learning rate", above=0)

    check(Config(batch_size=0))    # JaxbatchError: batch_size must be 1 or more, got 0
    add_flags(parser, Config)      # --batch-size N (default 32), --lr X, ...
    Config(**given(args, Config))  # the flags the user gave, nothing else

A tuple setting is a list of values, comma-separated on the command line
(`--batch-sizes 1,2,4`): it must list at least one, and every item is
checked as a setting of its own (`item=int, at_least=1`).

A flag parses its text with the same rule the library checks (`parse`), so
`--batch-size 0` and `Config(batch_size=0)` fail with the same words; the
command line names the flag, the library the field (errors.JaxbatchError's
`{setting}`). Rules that tie several settings together (DP's noise needs a
clip norm) stay with the code that knows why.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

from jaxbatch.errors import JaxbatchError


def setting(default, help: str, *, type=None, item=None, choices=None, at_least=None, above=None, at_most=None,
            below=None, finite=True, optional=None, flag=True, metavar=None, group=None, kind=None):
    """A dataclass field with what the checks and the flags need to know.

    type: int, float, str, bool or tuple (default: the default's type);
    item: a tuple's item type, int, float or str (default: its first
    item's), and the other rules then hold for every item; optional:
    None is a valid value (default: when the default is None); choices: the
    valid strings (and `kind` names them in errors: "unknown optimizer");
    at_least / above / at_most / below: the range of a number (finite=False
    admits inf for a float); flag=False keeps a
    setting out of the command line (library-only); group: the flag's
    heading in --help."""
    if type is None:
        type = tuple if isinstance(default, tuple) else builtin_type(default)
    if type is tuple:
        item = item or (builtin_type(default[0]) if default else None)
        if item not in (int, float, str):
            raise TypeError(f"give setting({default!r}, ...) an item= of int, float or str")
    if optional is None:
        optional = default is None
    return dataclasses.field(default=default, metadata=dict(
        help=help, type=type, item=item, choices=tuple(choices) if choices else None, at_least=at_least,
        above=above, at_most=at_most, below=below, finite=finite, optional=optional, flag=flag, metavar=metavar,
        group=group, kind=kind))


def builtin_type(value):
    for t in (bool, int, float, str):
        if isinstance(value, t):
            return t
    raise TypeError(f"give setting({value!r}, ...) a type=")


def declared(cls) -> list[dataclasses.Field]:
    """The fields of `cls` declared with `setting`."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def problem(value, meta) -> str | None:
    """What is wrong with `value` for a setting, in words, or None."""
    t = meta["type"]
    if value is None:
        return None if meta["optional"] else "must be given"
    if t is tuple:
        return tuple_problem(value, meta)
    if meta["choices"] is not None:
        if value not in meta["choices"]:
            return f"choose one of: {', '.join(meta['choices'])}"
        return None
    if t is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if t is str:
        return None if isinstance(value, str) else f"must be text, got {value!r}"
    numeric = (int,) if t is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric):
        return f"expected a {'whole number' if t is int else 'number'}, got {value!r}"
    if math.isnan(value) or (meta["finite"] and not math.isfinite(value)):
        return f"expected a finite number, got {value}"
    if meta["at_least"] is not None and value < meta["at_least"]:
        return f"must be {number(meta['at_least'])} or more, got {number(value)}"
    if meta["above"] is not None and not value > meta["above"]:
        return f"must be greater than {number(meta['above'])}, got {number(value)}"
    if meta["at_most"] is not None and value > meta["at_most"]:
        return f"must be {number(meta['at_most'])} or less, got {number(value)}"
    if meta.get("below") is not None and not value < meta["below"]:
        return f"must be less than {number(meta['below'])}, got {number(value)}"
    return None


def tuple_problem(value, meta) -> str | None:
    """What is wrong with a tuple setting's value, or None: it lists at least
    one item, and each item is valid by the setting's rules."""
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        return f"must be a tuple, got {value!r}"
    if not value:
        choose = f"; choose from: {', '.join(meta['choices'])}" if meta["choices"] else ""
        return f"must list at least one {meta['kind'] or 'value'}{choose}"
    for item in value:
        wrong = problem(item, {**meta, "type": meta["item"], "optional": False})
        if wrong is not None:
            return f"unknown {meta['kind'] or 'value'} {item!r}; {wrong}" if meta["choices"] else wrong
    return None


def number(value) -> str:
    """1, 4294967295, 0.05, 1e-05: whole numbers in full, others as %g."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def check(config) -> None:
    """Raise JaxbatchError, naming the setting, for the first field whose
    value is not valid."""
    for field in declared(type(config)):
        value = getattr(config, field.name)
        wrong = problem(value, field.metadata)
        if wrong is None:
            continue
        if field.metadata["type"] is tuple:  # "unknown model 'x'; ..." names the item, the rest the setting
            raise JaxbatchError(wrong if wrong.startswith("unknown ") else f"{{setting}} {wrong}", setting=field.name)
        if field.metadata["choices"] is not None and value is not None:
            kind = field.metadata["kind"] or field.name.replace("_", " ")
            raise JaxbatchError(f"unknown {kind} {value!r}; {wrong}", setting=field.name)
        kind = f"{field.metadata['kind']} " if field.metadata["kind"] else ""
        raise JaxbatchError(f"{kind}{{setting}} {wrong}", setting=field.name)


def parse(text: str, meta):
    """A flag's text -> its value, checked by the same rule as `check`.
    A tuple's text is comma-separated: "1,2,4" -> (1, 2, 4)."""
    t = meta["type"]
    try:
        if t is tuple:
            value = tuple(meta["item"](part.strip()) for part in text.split(",") if part.strip())
        else:
            value = t(text)
    except ValueError:
        if t is tuple:
            raise argparse.ArgumentTypeError(f"expected comma-separated {meta['item'].__name__} values, got {text!r}")
        raise argparse.ArgumentTypeError(f"expected a {'whole number' if t is int else 'number'}, got {text!r}")
    wrong = problem(value, meta)
    if wrong:
        raise argparse.ArgumentTypeError(wrong)
    return value


def add_flags(parser, cls, skip=(), presets=None) -> None:
    """One flag per setting of `cls` (--batch-size for batch_size), default
    None so that `given` can tell what the user typed; groups by `group`.
    presets: {flag: {setting: value}}, the values another flag gives some
    settings, shown after the default where they differ ({"--quick": QUICK}:
    "default 16384; --quick: 4096")."""
    defaults = cls()
    groups = {}
    for field in declared(cls):
        meta = field.metadata
        if not meta["flag"] or field.name in skip:
            continue
        where = parser
        if meta["group"]:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            where = groups[meta["group"]]
        default = getattr(defaults, field.name)
        help_text = meta["help"]
        shown = [f"{flag}: {show(values[field.name])}" for flag, values in (presets or {}).items()
                 if values.get(field.name, default) != default]
        if default is not None and default != "" and meta["type"] is not bool:
            shown.insert(0, f"default {show(default)}")
        if meta["type"] is tuple:
            shown.insert(0, "comma-separated")
        if shown:
            help_text += f" ({'; '.join(shown)})"
        name = "--" + field.name.replace("_", "-")
        if meta["type"] is bool:
            where.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif meta["choices"] is not None and meta["type"] is not tuple:  # a tuple's choices: `parse` checks them
            where.add_argument(name, choices=list(meta["choices"]), default=None, help=help_text)
        else:
            where.add_argument(name, type=lambda text, meta=meta: parse(text, meta), default=None,
                               metavar=meta["metavar"], help=help_text)


def show(value) -> str:
    """A setting's value as --help shows it: 0.05, 1e-05, 1,2,4."""
    if isinstance(value, tuple):
        return ",".join(map(show, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def given(args, cls) -> dict:
    """The settings of `cls` the user gave as flags: {name: value}."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if getattr(args, f.name, None) is not None}
