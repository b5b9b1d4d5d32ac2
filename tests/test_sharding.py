"""Sharding rules (golden, pod-sized meshes without devices) and sharded == single-device math on
8 fake CPU devices."""
import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import llama4_jax as l4
import sharding as sh
from train import config as run_config

POD_MESHES = [{"fsdp": 16, "expert": 16}, {"data": 2, "fsdp": 8, "expert": 16},
              {"fsdp": 8, "expert": 8, "tensor": 4}, {"data": 4, "fsdp": 32, "expert": 4}]


def _leaves(cfg, mesh_shape):
  specs = l4.param_specs(cfg)
  parts = sh.partition_specs(cfg, mesh_shape)
  flat_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=l4.is_spec)[0]
  flat_parts = jax.tree.leaves(parts, is_leaf=lambda x: isinstance(x, P))
  return [(jax.tree_util.keystr(p), s, part) for (p, s), part in zip(flat_specs, flat_parts)]


@pytest.mark.parametrize("preset", ["scout", "maverick"])
@pytest.mark.parametrize("mesh_shape", POD_MESHES, ids=lambda m: "-".join(f"{k}{v}" for k, v in m.items()))
def test_golden_rules_for_released_models(preset, mesh_shape):
  cfg = getattr(l4.presets, preset)()
  fe = ("fsdp", "expert")  # non-expert weights: D over every non-data device
  want = {  # logical axes -> spec, written out by hand from the design
      ("vocab", "embed"): ("tensor", fe),
      ("layers", "expert", "embed", "mlp"): (None, "expert", "fsdp", "tensor"),
      ("layers", "expert", "mlp", "embed"): (None, "expert", "tensor", "fsdp"),
      ("layers", "embed", "q_heads", "head_dim"): (None, fe, "tensor", None),
      ("layers", "q_heads", "head_dim", "embed"): (None, "tensor", None, fe),
      ("layers", "embed", "router"): (None, fe, None),
      ("layers", "norm"): (None, None),
      # vision tower: widths over fsdp, heads over tensor, MLP over expert x tensor
      ("layers", "vision_embed", "vision_heads", "head_dim"): (None, "fsdp", "tensor", None),
      ("layers", "vision_embed", "vision_mlp"): (None, "fsdp", ("expert", "tensor")),
      ("vision_mlp", "vision_proj"): (("expert", "tensor"), "fsdp"),
      ("vision_proj", "embed"): (fe, None),
  }

  def present(entry):  # mesh axes of size 1 drop out of a spec
    axes = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ())
                 if mesh_shape.get(a, 1) > 1)
    return axes[0] if len(axes) == 1 else (axes or None)
  offenders = []
  for name, spec, part in _leaves(cfg, mesh_shape):
    expected = want.get(spec.axes)
    if expected is not None:
      expected = tuple(present(a) for a in expected)
      assert tuple(part) + (None,) * (len(spec.shape) - len(part)) == expected, name
    if "expert" in spec.axes:
      assert part[spec.axes.index("expert")] == "expert", name
    if mesh_shape.get("fsdp", 1) > 1 and all(p is None for p in part):
      if math.prod(spec.shape) * 2 > 2**20:  # bf16 bytes
        offenders.append(name)
  assert not offenders, f"params over 1 MiB fully replicated with fsdp > 1: {offenders}"


def test_bad_meshes_fail_before_compiling():
  with pytest.raises(ValueError, match="multiply to 4, but there are 8 devices"):
    sh.make_mesh(sh.MeshConfig(data=2, fsdp=2))
  assert sh.resolve(sh.MeshConfig(fsdp=-1, expert=2), 8)["fsdp"] == 4
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sh.MeshConfig(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match=r"axis 'expert' of size 4 is not divisible by mesh axes \('expert',\)"):
    sh.partition_specs(l4.presets.tiny(), {"expert": 8})
  with pytest.raises(run_config.ConfigError, match=r"unknown key\(s\) \['pipeline'\] in mesh; valid keys: \['data', 'fsdp'"):
    run_config.load(None, ("mesh.pipeline=2",))


CFG = l4.Config(text=dataclasses.replace(l4.presets.tiny().text, num_local_experts=8,
                                         initializer_range=0.125))


def _loss(params, ids, hooks=l4.Hooks()):
  out = l4.apply(CFG, params, ids, hooks=hooks)
  logits = out.logits[:, :-1]
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[:, 1:, None], -1)[..., 0]
  return jnp.mean(nll), out.expert_counts


@pytest.fixture(scope="module")
def single_device():
  params = jax.jit(l4.init_params, static_argnums=0)(CFG, jax.random.key(0))
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 256, (8, 24)))
  (loss, counts), grads = jax.jit(jax.value_and_grad(_loss, has_aux=True))(params, ids)
  return params, ids, loss, counts, grads


MESHES = [dict(data=2, fsdp=2, expert=2), dict(fsdp=2, expert=4), dict(expert=8),
          dict(fsdp=4, tensor=2), dict(context=2, fsdp=2, expert=2)]


CASES = [(m, ep) for m in MESHES for ep in (False, True)
         if (not ep or m.get("expert", 1) > 1) and not (m.get("context") and not ep)]


@pytest.mark.parametrize("mesh_cfg,ep", CASES, ids=lambda v: (
    "-".join(f"{k}{n}" for k, n in v.items()) if isinstance(v, dict)
    else ("expert_parallel" if v else "gspmd_moe")))
def test_sharded_loss_and_grads_equal_single_device(single_device, mesh_cfg, ep):
  params, ids, loss, counts, grads = single_device
  mesh = sh.make_mesh(sh.MeshConfig(**mesh_cfg))
  param_sh = sh.param_shardings(CFG, mesh)
  hooks = sh.hooks(mesh) if ep else sh.hooks(mesh)._replace(moe_fn=l4.model.moe.moe)
  fn = jax.jit(jax.value_and_grad(partial(_loss, hooks=hooks), has_aux=True),
               in_shardings=(param_sh, sh.batch_sharding(mesh)),
               out_shardings=((None, None), param_sh))  # grads sharded like params, as in training
  (s_loss, s_counts), s_grads = fn(jax.device_put(params, param_sh),
                                   jax.device_put(ids, sh.batch_sharding(mesh)))
  assert s_grads["blocks"][1]["moe"]["gate"].sharding.spec == param_sh["blocks"][1]["moe"]["gate"].spec
  np.testing.assert_allclose(np.asarray(s_loss), np.asarray(loss), atol=1e-5, rtol=0)
  np.testing.assert_array_equal(np.asarray(s_counts), np.asarray(counts))  # nothing dropped
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5,
                                                       rtol=0), s_grads, grads)


def test_expert_parallel_drops_nothing_when_every_token_picks_one_expert(single_device):
  params, ids, _, _, _ = single_device
  # zero routers: all logits tie and top-k takes the lowest index, expert 0, for every token
  skewed = jax.tree.map(lambda a: a, params)
  for block in skewed["blocks"]:
    if "moe" in block:
      block["moe"]["router"] = jnp.zeros_like(block["moe"]["router"])
  want = jax.jit(lambda p: l4.apply(CFG, p, ids))(skewed)
  mesh = sh.make_mesh(sh.MeshConfig(fsdp=2, expert=4))
  param_sh = sh.param_shardings(CFG, mesh)
  got = jax.jit(lambda p, i: l4.apply(CFG, p, i, hooks=sh.hooks(mesh)),
                in_shardings=(param_sh, sh.batch_sharding(mesh)))(skewed, ids)
  assert np.asarray(got.expert_counts)[:, 0].tolist() == [8 * 24] * 2
  np.testing.assert_array_equal(np.asarray(got.expert_counts), np.asarray(want.expert_counts))
  np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dispatch", ["all_to_all", "all_gather"])
def test_both_dispatches_on_packed_rows_equal_single_device(single_device, dispatch):
  """Packed documents (segment ids, positions restarting) through the expert-parallel MoE."""
  params, ids, _, _, _ = single_device
  seg = np.repeat(np.array([[1] * 5 + [2] * 11 + [3] * 8]), 8, axis=0)
  pos = np.concatenate([np.arange(5), np.arange(11), np.arange(8)])[None].repeat(8, 0)

  def loss(p, hooks):
    out = l4.apply(CFG, p, ids, segment_ids=seg, positions=pos, hooks=hooks)
    return jnp.mean(jnp.sin(out.logits)), (out.logits, out.expert_counts)
  (want, (logits, counts)), grads = jax.jit(jax.value_and_grad(
      partial(loss, hooks=l4.Hooks()), has_aux=True))(params)
  mesh = sh.make_mesh(sh.MeshConfig(data=2, expert=2, fsdp=2))
  hooks = sh.hooks(mesh, dispatch=dispatch)
  (got, (s_logits, s_counts)), s_grads = jax.jit(
      jax.value_and_grad(partial(loss, hooks=hooks), has_aux=True),
      in_shardings=(sh.param_shardings(CFG, mesh),))(params)
  np.testing.assert_array_equal(np.asarray(s_counts), np.asarray(counts))
  np.testing.assert_allclose(np.asarray(s_logits), np.asarray(logits), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5,
                                                       rtol=1e-5), s_grads, grads)


def test_multimodal_loss_and_grads_sharded_equal_single_device():
  """Vision tower + per-row fusion under the training loss: tiles data-parallel (the tower's
  stream is constrained at every layer), weights FSDP/expert-sharded, MoE expert-parallel."""
  from train.stages import lm as pretrain
  cfg = l4.presets.tiny_multimodal()
  rng = np.random.RandomState(1)
  tokens = rng.randint(0, 256, (8, 24)).astype(np.int32)
  tokens[:, 2:2 + 2 * cfg.vision.tokens_per_tile] = cfg.image_token_index  # 2 tiles a row
  batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens),
           "positions": np.broadcast_to(np.arange(24, dtype=np.int32), tokens.shape),
           "loss_mask": (tokens != cfg.image_token_index).astype(np.int32),
           "pixel_values": rng.randn(8, 2, 3, 56, 56).astype(np.float32)}
  params = jax.jit(l4.init_params, static_argnums=0)(cfg, jax.random.key(2))

  def grads_fn(hooks):
    loss_fn = pretrain.make_loss(cfg, jnp.float32, False, 0.0, 0.0, hooks)
    return jax.value_and_grad(lambda p, b: loss_fn(p, b)[0])
  loss, grads = jax.jit(grads_fn(l4.Hooks()))(params, batch)
  mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=2, expert=2))
  param_sh, batch_sh = sh.param_shardings(cfg, mesh), sh.batch_sharding(mesh)
  s_loss, s_grads = jax.jit(grads_fn(sh.hooks(mesh)), in_shardings=(param_sh, batch_sh),
                            out_shardings=(None, param_sh))(params, batch)
  np.testing.assert_allclose(np.asarray(s_loss), np.asarray(loss), rtol=1e-5)
  assert np.abs(np.asarray(grads["vision"]["patch"])).max() > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5,
                                                       rtol=0), s_grads, grads)


def test_context_parallel_attention_equals_one_device_on_packed_rows(single_device):
  """Small query blocks: chunked layers read a sliding key window at a traced offset, and packed
  documents restart their chunks mid-shard."""
  params, ids, _, _, _ = single_device
  seg = np.repeat(np.array([[1] * 5 + [2] * 11 + [3] * 8]), 8, axis=0)  # 24 tokens, 3 documents
  want = jax.jit(lambda p: l4.apply(CFG, p, ids, segment_ids=seg).logits)(params)
  mesh = sh.make_mesh(sh.MeshConfig(data=2, context=4))
  hooks = l4.Hooks(constrain=sh.constrain_fn(mesh), attend_fn=sh.context.attend_fn(mesh, block=2))
  got = jax.jit(lambda p: l4.apply(CFG, p, ids, segment_ids=seg, hooks=hooks).logits,
                in_shardings=(sh.param_shardings(CFG, mesh),))(params)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
  assert sh.context.attend_fn(sh.make_mesh(sh.MeshConfig(data=8))) is None


@pytest.mark.parametrize("name,mesh_shape", [("scout", {"fsdp": 16, "expert": 16}),
                                             ("maverick", {"data": 2, "fsdp": 8, "expert": 32})])
def test_rules_report_places_every_parameter_without_devices(name, mesh_shape):
  """`sharding.report` (and `llama4-plan --rules`): pod meshes, no device touched."""
  from sharding import report
  from train import plan
  cfg = getattr(l4.presets, name)()
  rows = report.placements(cfg, mesh_shape, "bfloat16")
  assert sum(r.total_bytes for r in rows) == 2 * l4.param_count(cfg)
  assert not report.replicated_above(rows, 2**20)  # every tensor over 1 MiB is split
  experts = [r for r in rows if "expert" in r.axes]
  assert experts and all("expert" in r.mesh_axes for r in experts)
  for r in rows:  # a device holds its shard: total / (product of the spec's mesh axes)
    split = int(np.prod([mesh_shape[a] for a in r.mesh_axes]))
    assert r.device_bytes * split == r.total_bytes, r.name
  one = report.placements(cfg, {}, "bfloat16")
  assert report.replicated_above(one, 2**30) == [r.name for r in one if r.total_bytes > 2**30]
  if name == "scout":
    text = plan.rules_report("configs/scout/pretrain.yaml", (), 256)
    assert text.startswith("mesh: fsdp 16 x expert 16 (256 devices)")
    assert "replicated on every device and over 1.00 MiB: none" in text


def test_my_mesh_splits_every_large_tensor():
  """The README's example ("Testing your sharding rules"), verbatim."""
  from sharding import report
  rows = report.placements(l4.presets.scout(), {"fsdp": 16, "expert": 16}, "bfloat16")
  assert not report.replicated_above(rows, 2**20)           # nothing over 1 MiB on every chip
  assert all("expert" in r.mesh_axes for r in rows if "expert" in r.axes)
  assert max(r.device_bytes for r in rows) < 256 * 2**20    # the largest shard
