"""The configs sdjax ships, addressable by name (``tiny``, ``tiny_autoencoder``) or by path.

Each is a Python file whose ``get_config(arg=None)`` returns an ``ml_collections.ConfigDict``;
``NAME:ARG`` (or ``PATH:ARG``) passes ARG, e.g. a variant. Its docstring carries the command
that runs it.
"""

import dataclasses
import importlib.util
import os
import re
import typing
from typing import Any

import ml_collections

_HERE = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
    """The shipped configs' names."""
    return sorted(f[:-3] for f in os.listdir(_HERE) if f.endswith(".py") and not f.startswith("_"))


def resolve(spec: str) -> str:
    """``NAME[:ARG]`` or ``PATH[:ARG]`` -> ``PATH[:ARG]`` with an absolute path to an existing file."""
    path, sep, arg = spec.partition(":")
    if os.path.isfile(path):
        return os.path.abspath(path) + sep + arg
    named = os.path.join(_HERE, f"{path}.py")
    if re.fullmatch(r"[A-Za-z0-9_]+", path) and os.path.isfile(named):
        return named + sep + arg
    raise FileNotFoundError(f"--config {spec}: no such config file, and not the name of a shipped config "
                            f"({', '.join(names())}).")


def load(spec: str) -> ml_collections.ConfigDict:
    """The ConfigDict of ``NAME[:ARG]`` or ``PATH[:ARG]``, as ``--config`` would load it."""
    path, sep, arg = resolve(spec).partition(":")
    module_spec = importlib.util.spec_from_file_location(f"sdjax_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if sep else module.get_config()


def section(cls: Any, exclude: tuple[str, ...] = (), **values: Any) -> ml_collections.ConfigDict:
    """A config section holding every field of the dataclass ``cls`` (but ``exclude``) at its default
    unless given: generated from the dataclass so the two cannot drift, and typed so the command
    line can set fields whose value is None (``--config.data.manual_dir=FOLDER``)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in exclude}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{unknown[0]} is not a field of {cls.__name__}; valid: {', '.join(sorted(fields))}.")
    out = {}
    for name, f in fields.items():
        if name in values:
            value = values[name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            value = f.default_factory()
        if value is None:
            types = [t for t in typing.get_args(f.type) if t is not type(None)]
            value = ml_collections.FieldReference(None, field_type=types[0] if types else str)
        out[name] = value
    return ml_collections.ConfigDict(out)


def read_section(cls: Any, section: ml_collections.ConfigDict | dict | None, name: str,
                 exclude: tuple[str, ...] = ()) -> Any:
    """The dataclass ``cls`` from a config section (absent: every default); a key that is not one of
    its fields is an error naming the valid ones. Lists become tuples where the field is a tuple."""
    values = {} if section is None else (section.to_dict() if hasattr(section, "to_dict") else dict(section))
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in exclude}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{name}.{unknown[0]} is not a setting of this section; valid keys: "
                         f"{', '.join(sorted(fields))}.")
    for key, value in values.items():
        if isinstance(value, list) and typing.get_origin(fields[key].type) is tuple:
            values[key] = tuple(value)
    return cls(**values)


def check_override(config: ml_collections.ConfigDict, dotted: str) -> None:
    """Raises a ValueError naming the valid keys if ``dotted`` (``train.batch_size``) is not in ``config``."""
    node, seen = config, []
    for part in dotted.split("."):
        keys = list(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
        if part not in keys:
            where = ".".join(seen) or "the config"
            raise ValueError(f"--config.{dotted}: {where} has no key {part!r}; valid keys there: "
                             f"{', '.join(sorted(keys)) or '(none: it is a value)'}.")
        node, seen = node[part], seen + [part]
