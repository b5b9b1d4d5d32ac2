"""Strict parsing of plain mappings (YAML, `--set` overrides, JSON) into typed dataclasses.

An unknown key is an error that lists the valid keys; a value of the wrong type is an error that
names the key and the expected type. `--set a.b=value` values are parsed as YAML scalars, then
checked like the file's values. Nothing is `eval`ed.
"""
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
  """A recipe that does not match the dataclasses, naming the offending key."""


def _type_name(tp) -> str:
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, key: str):
  """Checks `value` against the annotation `tp`; returns it converted (lists -> tuples)."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    errors = []
    for a in args:
      if a is type(None):
        continue
      try:
        return _convert(value, a, key)
      except ConfigError as e:
        errors.append(e)
    if len(errors) == 1:  # `X | None`: X's own error names the key inside it
      raise errors[0]
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
  if dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    if not isinstance(value, dict):
      raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
    return from_dict(tp, value, key)
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key}: expected a list, got {value!r}")
    return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
  if origin is dict or tp is dict:
    if not isinstance(value, dict):
      raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return dict(value)
  if tp is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
    try:
      return float(value)
    except ValueError:
      pass
  if tp in (int, float, str, bool) and (type(value) is not tp):
    raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
  return value


def from_dict(cls, d: dict, prefix: str = ""):
  """Builds dataclass `cls` from a dict; unknown keys and wrong types are errors."""
  hints = typing.get_type_hints(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(d) - set(names))
  if unknown:
    where = f" in {prefix}" if prefix else ""
    raise ConfigError(f"unknown key(s) {unknown}{where}; valid keys: {names}")
  kw = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in d.items()}
  try:
    return cls(**kw)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def apply_override(d: dict, assignment: str) -> None:
  """One `--set key.path=value` into the recipe mapping `d` (the value parsed as YAML)."""
  if "=" not in assignment:
    raise ConfigError(f"--set expects key.path=value, got {assignment!r}")
  path, raw = assignment.split("=", 1)
  keys = path.strip().split(".")
  node = d
  for k in keys[:-1]:
    node = node.setdefault(k, {})
    if not isinstance(node, dict):
      raise ConfigError(f"--set {path}: {k} is not a section")
  try:
    node[keys[-1]] = yaml.safe_load(raw)
  except yaml.YAMLError as e:
    raise ConfigError(f"--set {path}: cannot parse the value {raw!r} ({e})") from e


def read_yaml(path: str | Path) -> dict:
  try:
    d = yaml.safe_load(Path(path).read_text()) or {}
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark else str(path)
    raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from e
  if not isinstance(d, dict):
    raise ConfigError(f"{path}: the top level must be a mapping")
  return d


def shallow_fields(obj) -> dict:
  """Shallow field dict (nested dataclasses kept as objects, unlike dataclasses.asdict)."""
  return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def to_dict(cfg) -> dict:
  return dataclasses.asdict(cfg)
