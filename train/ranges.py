"""Range checks for the recipe dataclasses' fields (`train/config.py`): each raises a ValueError
naming `section.field`, its value and the rule; a field left unset (None) passes."""
import math


def require(section: str, obj, rule: str, ok, *names: str) -> None:
  """Raises naming `section.name` for the first field (unset: None is allowed) failing `ok`."""
  for name in names:
    value = getattr(obj, name)
    if value is not None and not (math.isfinite(value) and ok(value)):
      raise ValueError(f"{section}.{name}={value!r}: must be {rule}")


def at_least(section: str, obj, low, *names: str) -> None:
  require(section, obj, f">= {low}", lambda v: v >= low, *names)


def positive(section: str, obj, *names: str) -> None:
  require(section, obj, "a finite number > 0", lambda v: v > 0, *names)


def fraction(section: str, obj, *names: str) -> None:
  require(section, obj, "in [0, 1)", lambda v: 0 <= v < 1, *names)
