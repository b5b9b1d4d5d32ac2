"""MetaP-style per-tensor hyperparameter transfer: tune on a small proxy, train the big model with
the same settings.

Meta published no details of MetaP; this is the public method closest to it
(docs/metap.md): muP for Adam across width, CompleteP across depth, the Adam
square-root rule across batch size and a fitted power law across training tokens, with tunable
per-module, per-relative-depth constants on top.

Every parameter is classified from the metadata its `ParamSpec` declares (axes, fan-in axes,
module), never from its name; a parameter that does not fit a class is an error:
  embedding  a lookup/added table, no fan-in (token embedding, vision positions)
  hidden     a matrix with declared fan-in (q/k/v/o, FFNs, each expert, vision layers, projector)
  router     d -> experts;   readout  d -> vocab (lm_head)
  vector     norms, biases, the CLS embedding
The expert axis is never fan-in: per-expert factors do not depend on the number of experts.

`resolve` compares the target config's shapes with the proxy's (`param_specs`: shapes only,
nothing allocated) and gives ONE table: per tensor, multipliers of the init std, the Adam LR, the
decoupled weight decay and Adam eps (per layer where constants vary with depth), plus the global
LR/betas/eps/decay after the batch and duration rules. With m_in = fan-in ratio, m_d = the tower's
width ratio, m_L = its depth ratio, under `mup`:
  hidden, router   init x m_in^-1/2   LR x m_in^-1   eps x m_d^-1 (x m_L^-alpha inside blocks)
                   (the router keeps fan-in init: width-invariant sigmoid gates at init)
  readout          init x m_in^-1     LR x m_in^-1   eps x m_d^-1
  embedding        init x 1           LR x 1         eps x m_d^-1
  vector           init x 1           LR x 1         eps x m_d^-1 (x m_L^-alpha inside blocks)
  residual branch outputs (o, down, expert down, shared down): the branch multiplier m_L^-alpha
  is absorbed into their init and LR (Adam's update is invariant to it), so checkpoints stay plain
  Llama 4 that HF loads; inside blocks the LR also takes m_L^(alpha-1) (1 for CompleteP's alpha 1).
  weight decay     lambda_p = lambda / lr_p ("timescale": eta * lr_p * lambda_p stays eta * lambda)
  batch kappa      LR x kappa^1/2, eps x kappa^-1/2, 1-beta x kappa, lambda x kappa^1/2
  tokens D/D0      LR x (D/D0)^-duration_exponent
`sp` is the control: every factor is 1. At target == base every factor is exactly 1 in both.
"""
import dataclasses
import json
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import llama4_jax as l4
from train.config import MetaPConfig, OptimConfig, from_dict, shallow_fields

VECTOR_AXES = {"norm", "bias"}
LOOKUP_AXES = {"vocab", "vision_pos"}  # tables indexed by token id / patch position
TOWER_WIDTH = {"text": "embed", "vision": "vision_embed"}
TOP_OF_MODEL = ("readout", "norm")  # unstacked tensors of these modules sit at relative depth 1


class Parametrization(NamedTuple):
  width_lr: float      # hidden, router, readout: LR x m_in^-width_lr
  width_init: float    # hidden, router: init std x m_in^-width_init
  readout_init: float  # readout: init std x m_in^-readout_init
  router_init: float   # router: init std x m_in^-router_init
  width_eps: float     # Adam eps x m_d^-width_eps
  depth_alpha: float   # residual branches x m_L^-alpha (absorbed into the branch output matrices)
  depth_lr: float      # in-block LR x m_L^depth_lr
  batch: float         # global LR x kappa^batch, eps x kappa^-batch, 1-beta x kappa
  wd_timescale: bool   # lambda_p = lambda / lr_p


SP = Parametrization(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, False)


def mup(alpha: float = 1.0) -> Parametrization:
  return Parametrization(1.0, 0.5, 1.0, 0.5, 1.0, alpha, alpha - 1.0, 0.5, True)


class Row(NamedTuple):
  cls: str                  # embedding | hidden | router | readout | vector
  module: str               # the constants' group (attn -> attn_rope / attn_nope by layer)
  fan_in: tuple[int, int]   # (base, target)
  branch: bool              # writes into the residual stream from inside a block
  init: tuple[float, ...]   # init std multiplier, per stacked layer row (one entry if unstacked)
  lr: tuple[float, ...]     # Adam LR multiplier, per row
  wd: tuple[float, ...]     # multiplier of optim.weight_decay, per row (0: not decayed)
  eps: float                # multiplier of optim.eps


class Table(NamedTuple):
  rows: dict[str, Row]      # parameter path -> row, in tree order
  optim: OptimConfig        # the global hyperparameters after the batch and duration rules
  key: dict                 # what a checkpoint must agree with to be restored under this table


def path_name(key_path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)


def _flat_specs(cfg: l4.Config) -> dict[str, l4.params.ParamSpec]:
  leaves = jax.tree_util.tree_flatten_with_path(l4.param_specs(cfg), is_leaf=l4.is_spec)[0]
  return {path_name(kp): s for kp, s in leaves}


def classify(path: str, spec) -> str:
  """The class of one parameter from its declared metadata; anything else is an error."""
  where = f"param {path} (axes {spec.axes}, fan_in {spec.fan_in}, module {spec.module!r})"
  if not spec.module:
    raise ValueError(f"{where}: declares no module; cannot assign hyperparameter rules")
  if set(spec.fan_in) - set(spec.axes):
    raise ValueError(f"{where}: fan_in names axes the tensor does not have")
  if {"expert", "layers"} & set(spec.fan_in):
    raise ValueError(f"{where}: the expert and layers axes are never fan-in")
  body = [a for a in spec.axes if a != "layers"]
  if VECTOR_AXES & set(body):  # norm scales/biases, per-head biases, the CLS embedding
    if spec.fan_in:
      raise ValueError(f"{where}: a norm/bias vector cannot have fan-in")
    return "vector"
  if spec.module in ("router", "readout"):
    if not spec.fan_in:
      raise ValueError(f"{where}: a {spec.module} must declare its fan-in")
    return spec.module
  if spec.fan_in:
    return "hidden"
  if len(body) == 2 and body[0] in LOOKUP_AXES:
    return "embedding"
  raise ValueError(f"{where}: cannot classify: no declared fan-in, and neither a norm/bias vector "
                   f"nor a table indexed by {sorted(LOOKUP_AXES)}")


def base_config(target: l4.Config, cfg: MetaPConfig) -> l4.Config:
  """The proxy: the target with `metap.base` / `metap.base_vision` overrides."""
  text = from_dict(l4.TextConfig, {**shallow_fields(target.text), **cfg.base}, "metap.base")
  vision = target.vision
  if cfg.base_vision:
    if vision is None:
      raise ValueError("metap.base_vision is set but the model has no vision tower")
    vision = from_dict(l4.VisionConfig, {**shallow_fields(vision), **cfg.base_vision}, "metap.base_vision")
  return l4.Config(text=text, vision=vision, image_token_index=target.image_token_index)


def _constant(cfg: MetaPConfig, module: str, field: str, rel_depth: float) -> float:
  v = cfg.constants.get(module, {}).get(field, 1.0)
  if not isinstance(v, (list, tuple)):
    return float(v)
  return float(v[min(int(rel_depth * len(v)), len(v) - 1)])


def _layer_rows(target: l4.Config, path: str, spec) -> list[tuple[int, float, str]]:
  """(layer index, relative depth, constants module) of each stacked row of one tensor."""
  if spec.axes[0] != "layers":
    return [(0, 1.0 if spec.module in TOP_OF_MODEL else 0.0, spec.module)]
  t = target.text
  if path.startswith("vision/"):
    n = target.vision.num_hidden_layers
    return [(i, i / max(n - 1, 1), spec.module) for i in range(n)]
  slot = int(path.split("/")[1])
  module = spec.module
  if module == "attn":
    module = "attn_rope" if t.uses_rope(slot) else "attn_nope"
  layers = range(slot, t.num_hidden_layers, t.period)
  return [(i, i / max(t.num_hidden_layers - 1, 1), module) for i in layers]


def _ratios(target: l4.Config, base: l4.Config, p: Parametrization) -> tuple[dict, dict]:
  widths = {"text": target.text.hidden_size / base.text.hidden_size}
  depths = {"text": target.text.num_hidden_layers / base.text.num_hidden_layers}
  if target.vision is not None:
    widths["vision"] = target.vision.hidden_size / base.vision.hidden_size
    depths["vision"] = target.vision.num_hidden_layers / base.vision.num_hidden_layers
    if depths["vision"] != 1 and p != SP:
      raise ValueError("metap: the vision tower's depth differs between proxy and target; depth "
                       "transfer covers the text tower only (keep base_vision.num_hidden_layers)")
  if target.text.tie_word_embeddings and widths["text"] != 1 and p != SP:
    raise ValueError("metap: tied embeddings cannot take both the embedding and the readout rule; "
                     "untie them (tie_word_embeddings: false) or keep the proxy's width")
  return widths, depths


def _fan_in(spec) -> int:
  """Product of the fan-in dimensions: the first dimension of each name in `spec.fan_in` (the
  adapter's [vision_proj, vision_proj] contracts its first)."""
  return math.prod(spec.shape[spec.axes.index(a)] for a in spec.fan_in)


def _row(path: str, spec, base_spec, target: l4.Config, cfg: MetaPConfig, p: Parametrization,
         widths: dict, depths: dict) -> Row:
  cls = classify(path, spec)
  tower = "vision" if path.startswith("vision/") else "text"
  fan = (_fan_in(base_spec), _fan_in(spec)) if spec.fan_in else (0, 0)
  m_in, m_d, m_L = fan[1] / fan[0] if fan[0] else 1.0, widths[tower], depths[tower]
  stacked = spec.axes[0] == "layers"
  outputs = set(spec.axes) - set(spec.fan_in)
  branch = stacked and cls == "hidden" and TOWER_WIDTH[tower] in outputs
  init, lr, eps = 1.0, 1.0, m_d ** -p.width_eps
  if cls in ("hidden", "router", "readout"):
    lr = m_in ** -p.width_lr
  if cls == "hidden":
    init = m_in ** -p.width_init
  if cls == "router":
    init = m_in ** -p.router_init
  if cls == "readout":
    init = m_in ** -p.readout_init
  if stacked:
    lr *= m_L ** p.depth_lr
    if branch:  # the forward multiplier m_L^-alpha, absorbed: W' = m W, init x m, LR x m
      init *= m_L ** -p.depth_alpha
      lr *= m_L ** -p.depth_alpha
    else:
      eps *= m_L ** -p.depth_alpha
  inits, lrs, wds = [], [], []
  decayed = cls != "vector"
  layer_rows = _layer_rows(target, path, spec)
  for _, rel, module in layer_rows:
    c_lr = lr * _constant(cfg, module, "lr", rel)
    inits.append(init * _constant(cfg, module, "init", rel))
    lrs.append(c_lr)
    wds.append(0.0 if not decayed or c_lr == 0 else (1.0 / c_lr if p.wd_timescale else 1.0))
  return Row(cls, layer_rows[0][2], fan, branch, tuple(inits), tuple(lrs), tuple(wds), eps)


def _global(optim: OptimConfig, cfg: MetaPConfig, p: Parametrization, batch_tokens: int,
            train_tokens: int) -> OptimConfig:
  """The batch (Adam square-root rule) and duration rules on the global hyperparameters."""
  kappa = batch_tokens / (cfg.base_batch_tokens or batch_tokens)
  horizon = train_tokens / (cfg.base_train_tokens or train_tokens)
  lr, eps, wd, b1, b2 = optim.lr, optim.eps, optim.weight_decay, optim.b1, optim.b2
  if kappa != 1 and p.batch:
    lr, eps, wd = lr * kappa ** p.batch, eps * kappa ** -p.batch, wd * kappa ** p.batch
    b1, b2 = 1 - kappa * (1 - b1), 1 - kappa * (1 - b2)
    for name, b in (("b1", b1), ("b2", b2)):
      if not 0 <= b < 1:
        raise ValueError(f"metap: the batch rule gives optim.{name}={b:.4g} (batch {kappa:g}x the "
                         f"proxy's); use a batch closer to base_batch_tokens")
  if horizon != 1 and cfg.duration_exponent:
    lr *= horizon ** -cfg.duration_exponent
  return dataclasses.replace(optim, lr=lr, eps=eps, weight_decay=wd, b1=b1, b2=b2)


def resolve(target: l4.Config, cfg: MetaPConfig, optim: OptimConfig, batch_tokens: int,
            train_tokens: int) -> Table:
  """The per-tensor table of `target` trained with `optim` settings tuned on the proxy."""
  p = SP if cfg.preset == "sp" else mup(cfg.depth_alpha)
  if p == SP and cfg.duration_exponent:
    raise ValueError("metap.duration_exponent needs preset mup (sp applies no transfer rule)")
  base = base_config(target, cfg)
  specs, base_specs = _flat_specs(target), _flat_specs(base)
  if specs.keys() != base_specs.keys():
    diff = sorted(specs.keys() ^ base_specs.keys())[:6]
    raise ValueError(f"metap: the proxy's parameters differ from the target's ({diff} ...): keep "
                     f"the same layer pattern (period, MoE interleave, NoPE interval)")
  widths, depths = _ratios(target, base, p)
  rows = {path: _row(path, s, base_specs[path], target, cfg, p, widths, depths)
          for path, s in specs.items()}
  key = {"preset": cfg.preset, "depth_alpha": cfg.depth_alpha if p != SP else None,
         "base_text": json.loads(json.dumps(dataclasses.asdict(base.text))),
         "base_vision": dataclasses.asdict(base.vision) if base.vision else None,
         "base_batch_tokens": cfg.base_batch_tokens, "base_train_tokens": cfg.base_train_tokens,
         "constants": cfg.constants}
  return Table(rows, _global(optim, cfg, p, batch_tokens, train_tokens), key)


def tree(table: Table, cfg: l4.Config, field: str) -> dict:
  """A params-shaped tree of one multiplier: float32 scalars, or [rows, 1, ...] arrays when it
  varies over a stacked tensor's layers."""
  def leaf(kp, spec):
    values = getattr(table.rows[path_name(kp)], field)
    values = values if isinstance(values, tuple) else (values,)
    if len(set(values)) == 1:
      return np.float32(values[0])
    return np.asarray(values, np.float32).reshape(-1, *[1] * (len(spec.shape) - 1))
  return jax.tree_util.tree_map_with_path(leaf, l4.param_specs(cfg), is_leaf=l4.is_spec)


def init_params(cfg: l4.Config, table: Table, key: jax.Array, dtype=jnp.float32) -> dict:
  """`l4.init_params` with each tensor's std scaled by its multiplier (bit-identical at 1)."""
  params = l4.init_params(cfg, key, jnp.float32)
  return jax.tree.map(lambda x, m: (x * m).astype(dtype), params, tree(table, cfg, "init"))


def _span(values: tuple[float, ...]) -> str:
  lo, hi = min(values), max(values)
  return f"{lo:.4g}" if lo == hi else f"{lo:.4g}..{hi:.4g}"


def format_table(table: Table) -> str:
  g = table.optim
  lines = [f"metap preset {table.key['preset']}: lr {g.lr:.4g}  b1 {g.b1:.4g}  b2 {g.b2:.4g}  "
           f"eps {g.eps:.3g}  weight_decay {g.weight_decay:.4g}",
           f"{'param':34} {'class':9} {'module':10} {'fan-in':>13} {'init x':>12} {'lr x':>12} "
           f"{'wd x':>12} {'eps x':>9}"]
  for path, r in table.rows.items():
    fan = f"{r.fan_in[0]}->{r.fan_in[1]}" if r.fan_in[1] else "-"
    lines.append(f"{path:34} {r.cls:9} {r.module:10} {fan:>13} {_span(r.init):>12} "
                 f"{_span(r.lr):>12} {_span(r.wd):>12} {r.eps:>9.4g}" + ("  branch" if r.branch else ""))
  return "\n".join(lines)


def log_table(table: Table, workdir) -> None:
  """WORKDIR/metap.txt, printed (only its first line and the path for plain SP), on process 0."""
  if jax.process_index() != 0:
    return
  text = format_table(table)
  (workdir / "metap.txt").write_text(text + "\n")
  print(text if table.key["preset"] != "sp" else text.splitlines()[0] + f" ({workdir}/metap.txt)")
