"""Collective traffic of a compiled program, read from its optimized HLO text.

Each collective's bytes are what one device sends, by the ring algorithm's count for a group of
n devices: all-gather (n-1)/n x its output; reduce-scatter (n-1) x its output (= (n-1)/n x its
input; the TPU's `all-reduce-scatter` fusions, an all-reduce then a slice, count as that);
all-reduce 2 (n-1)/n x its size; all-to-all (n-1)/n x its size; ragged-all-to-all
(n-1)/n x its output buffer (an upper bound: the bytes actually sent depend on the routing);
collective-permute its size. Collectives inside loops count once per iteration (the loop's
`known_trip_count`, or the bound N of its condition `i < N`, as jax's scans compile), inside
called computations once per call. Collectives in the branches of a conditional (the MoE's overflow
pass) run only when their branch is taken: they are counted apart (`conditional=True`: as if every
branch ran once per call).
"""
import re
from collections import defaultdict

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all",
         "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
               "s4": 0.5, "u4": 0.5, "c64": 8, "c128": 16}
_OP = re.compile(r"=\s*(.*?)\s+([\w\-]+)\(")
_SHAPE = re.compile(r"\b([a-z]+\d*(?:e\dm\d(?:fn)?)?)\[([\d,]*)\]")
_CALLS = re.compile(r"(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONST = re.compile(r"%([\w.\-]+)\s*=\s*s32\[\]\S*\s+constant\((\d+)\)")
_LT = re.compile(r"compare\(%[\w.\-]+,\s*%([\w.\-]+)\),\s*direction=LT")


def _bytes(shape_text: str) -> list[float]:
  return [DTYPE_BYTES.get(dt, 4) * _prod(dims) for dt, dims in _SHAPE.findall(shape_text)
          if dt in DTYPE_BYTES]


def _prod(dims: str) -> int:
  n = 1
  for d in filter(None, dims.split(",")):
    n *= int(d)
  return n


def _group_size(line: str, num_devices: int) -> int:
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)  # mesh['a'=2,..] {'a'}
  if m:
    sizes = {k.strip("'"): int(v) for k, v in (a.split("=") for a in m.group(1).split(","))}
    axes = [a.strip().strip("'") for a in m.group(2).split(",") if a.strip()]
    return _prod(",".join(str(sizes[a]) for a in axes)) if axes else num_devices
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)  # iota form [groups, size]<=[...]
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if m and m.group(1):
    return len(m.group(1).split(","))
  return num_devices


def _sent(kind: str, out_bytes: list[float], n: int) -> float:
  if n <= 1 and kind != "collective-permute":
    return 0.0
  if kind == "all-gather":
    return max(out_bytes) * (n - 1) / n
  if kind == "reduce-scatter":
    return sum(out_bytes) * (n - 1)
  if kind == "reduce-scatter (full input)":
    return sum(out_bytes) * (n - 1) / n
  if kind == "all-reduce":
    return 2 * sum(out_bytes) * (n - 1) / n
  if kind == "collective-permute":
    return max(out_bytes)
  if kind == "all-to-all":  # one array, or a tuple of one per peer (XLA:CPU): all of it
    return sum(out_bytes) * (n - 1) / n
  return max(out_bytes) * (n - 1) / n  # ragged-all-to-all: its output buffer


def _parse(hlo: str):
  """computation -> [(kind, line, output bytes)], computation -> [(callee, times, is a branch)],
  entry."""
  comps, calls, entry, current = defaultdict(list), defaultdict(list), None, None
  bounds, consts, loops = {}, {}, []  # a loop condition's `i < N`: N iterations (jax's scans)
  for line in hlo.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):  # a computation
      words = line.split()
      current = words[1 if words[0] == "ENTRY" else 0].lstrip("%")
      entry = current if words[0] == "ENTRY" else entry
      continue
    op = _OP.search(line)
    if current is None or op is None:
      continue
    const = _CONST.search(line)
    if const:
      consts[const.group(1)] = int(const.group(2))
    bound = _LT.search(line)
    if bound and bound.group(1) in consts:
      bounds[current] = consts[bound.group(1)]
    trip = _TRIP.search(line)
    loop = {k: v for k, v in _CALLS.findall(line) if k in ("body", "condition")}
    if loop:
      loops.append((current, loop, int(trip.group(1)) if trip else None))
    for key, callee in _CALLS.findall(line):
      if key not in loop:
        calls[current].append((callee, 1, key.endswith("_computation")))
    for branches in _BRANCHES.findall(line):
      calls[current] += [(b.strip().lstrip("%"), 1, True) for b in branches.split(",") if b.strip()]
    name = op.group(2)
    kind = name[:-6] if name.endswith("-start") else name
    if kind in KINDS:
      if kind == "all-reduce" and current.startswith("all-reduce-scatter"):
        kind = "reduce-scatter (full input)"  # the TPU's fused all-reduce + slice
      comps[current].append((kind, line, _bytes(op.group(1))))
  for caller, loop, trip in loops:
    n = trip if trip is not None else bounds.get(loop.get("condition"), 1)
    calls[caller] += [(callee, n, False) for callee in loop.values()]
  return comps, calls, entry


def collective_bytes(hlo: str, num_devices: int, conditional: bool = False) -> dict[str, float]:
  """Bytes one device sends per execution of the program, by collective kind: outside the
  branches of conditionals, or (`conditional`) inside them."""
  comps, calls, entry = _parse(hlo)
  times = defaultdict(float)

  def visit(comp: str, n: float, in_branch: bool, depth: int = 0):
    if in_branch == conditional:
      times[comp] += n
    if depth < 64:
      for callee, k, branch in calls.get(comp, ()):
        visit(callee, n * k, in_branch or branch, depth + 1)
  visit(entry, 1.0, False)
  out = {k: 0.0 for k in KINDS}
  for comp, ops in comps.items():
    for kind, line, sizes in ops:
      if sizes:
        out[kind.split(" ")[0]] += times[comp] * _sent(kind, sizes, _group_size(line, num_devices))
  return out
