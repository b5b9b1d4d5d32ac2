"""MetaP tables: classification from declared metadata, exact multiplier algebra (width, depth,
batch), identity at the proxy's shapes (bit-identical init and updates), init statistics, the
optimizer wiring, expert-count independence, and the checkpoint guard."""
import dataclasses
import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import llama4_jax as l4
from llama4_jax.params import ParamSpec
from train import checkpoint, metap, metap_check, optim
from train.config import CheckpointConfig, ConfigError, MetaPConfig, OptimConfig, load

BASE = metap_check.base_overrides(metap_check.width_config(32))
OPT = OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0, weight_decay=0.1, clip_norm=1e9,
                  eps=1e-8)


def _table(target, preset="mup", base=BASE, opt=OPT, tokens=(128, 128 * 10), **kw):
  return metap.resolve(target, MetaPConfig(preset=preset, base=base, **kw), opt, *tokens)


def test_every_param_is_classified_from_its_metadata():
  expected = {"embed": "embedding", "lm_head": "readout", "final_norm": "vector",
              "blocks/0/q": "hidden", "blocks/0/o": "hidden", "blocks/0/attn_norm": "vector",
              "blocks/1/moe/router": "router", "blocks/1/moe/gate": "hidden",
              "blocks/1/moe/down": "hidden", "blocks/1/moe/shared_up": "hidden",
              "vision/patch": "hidden", "vision/pos": "embedding", "vision/cls": "vector",
              "vision/layers/q_bias": "vector", "vision/layers/fc2": "hidden",
              "projector": "hidden"}
  for cfg in (l4.presets.tiny_multimodal(), l4.presets.scout(), l4.presets.maverick()):
    table = metap.resolve(cfg, MetaPConfig(), OptimConfig(), 1, 1)
    assert len(table.rows) == len(jax.tree.leaves(l4.param_axes(cfg), is_leaf=lambda x: isinstance(x, tuple)))
    for path, cls in expected.items():
      assert table.rows[path].cls == cls, path
    branch = sorted(p for p, r in table.rows.items() if r.branch and p.startswith("blocks/1/"))
    assert branch == ["blocks/1/moe/down", "blocks/1/moe/shared_down", "blocks/1/o"]
  modules = {p: r.module for p, r in metap.resolve(l4.presets.tiny(), MetaPConfig(), OptimConfig(),
                                                   1, 1).rows.items()}
  assert modules["blocks/0/q"] == "attn_rope" and modules["blocks/3/q"] == "attn_nope"
  assert modules["blocks/0/mlp/up"] == "ffn_dense" and modules["blocks/1/moe/up"] == "ffn_expert"


@pytest.mark.parametrize("spec,msg", [
    (ParamSpec((4, 4), ("embed", "mlp"), None, ("embed",), ""), "declares no module"),
    (ParamSpec((4, 4), ("embed", "mlp"), None, (), "attn"), "cannot classify"),
    (ParamSpec((2, 4, 4), ("expert", "embed", "mlp"), None, ("expert", "embed"), "ffn_expert"),
     "never fan-in"),
    (ParamSpec((4,), ("norm",), None, ("norm",), "norm"), "cannot have fan-in"),
    (ParamSpec((4, 4), ("embed", "router"), None, (), "router"), "must declare its fan-in"),
    (ParamSpec((4, 4), ("embed", "mlp"), None, ("vocab",), "attn"), "does not have"),
])
def test_unclassifiable_params_are_errors(spec, msg):
  with pytest.raises(ValueError, match=msg):
    metap.classify("some/param", spec)


def _flat(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_target_equal_to_base_is_identity_bit_for_bit():
  cfg = metap_check.width_config(32)
  for preset in ("sp", "mup"):
    table = _table(cfg, preset)
    for r in table.rows.values():
      assert set(r.init) == {1.0} and set(r.lr) == {1.0} and r.eps == 1.0
      assert set(r.wd) == ({0.0} if r.cls == "vector" else {1.0})
    assert table.optim == OPT
  table = _table(cfg, "mup")
  for dtype in (jnp.float32, jnp.bfloat16):
    ours = metap.init_params(cfg, table, jax.random.key(3), dtype)
    want = l4.init_params(cfg, jax.random.key(3), dtype)
    for a, b in zip(_flat(ours), _flat(want)):
      np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
  # the first updates equal optax.adamw's exactly
  params = l4.init_params(cfg, jax.random.key(0))
  tx, lr = optim.make(OPT, cfg, 10, (), table)
  ref = optax.chain(optax.clip_by_global_norm(OPT.clip_norm),
                    optax.adamw(lr, OPT.b1, OPT.b2, OPT.eps, weight_decay=OPT.weight_decay,
                                mask=optim.decay_mask(cfg)))
  (p1, s1), (p2, s2) = (params, tx.init(params)), (params, ref.init(params))
  ours, theirs = jax.jit(tx.update), jax.jit(ref.update)
  for i in range(5):
    g = jax.tree.map(lambda x: x * (i - 2.5), params)
    u1, s1 = ours(g, s1, p1)
    u2, s2 = theirs(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  for a, b in zip(_flat(p1), _flat(p2)):
    np.testing.assert_array_equal(a, b)


def test_clipping_equals_optax():
  """Under the norm: bit for bit; clipping: within an ulp; a NaN or inf gradient gives what
  optax's does (the step's finite check then keeps the state)."""
  g = {"a": jnp.linspace(-3.0, 2.0, 37), "b": jnp.full((5, 3), 0.7)}
  for max_norm, rtol in ((1e9, 0), (1.0, 2 ** -23)):
    ours, _ = jax.jit(optim.clip_by_global_norm(max_norm).update)(g, optax.EmptyState())
    theirs, _ = jax.jit(optax.clip_by_global_norm(max_norm).update)(g, optax.EmptyState())
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=0), ours, theirs)
    # the train step passes the norm it has: the same bits as the clip's own
    given, _ = jax.jit(partial(optim.clip_by_global_norm(max_norm).update,
                               global_norm=optax.tree.norm(g)))(g, optax.EmptyState())
    jax.tree.map(np.testing.assert_array_equal, given, ours)
  assert float(optax.tree.norm(ours)) == pytest.approx(1.0, rel=1e-6)
  # own_norm (frozen params: the step's norm counts gradients the clip never sees) ignores it
  own, _ = optim.clip_by_global_norm(1.0, own_norm=True).update(g, optax.EmptyState(),
                                                                 global_norm=jnp.float32(1e6))
  jax.tree.map(np.testing.assert_array_equal, own, ours)
  for bad in (jnp.nan, jnp.inf):
    bad_g = {**g, "b": g["b"].at[0, 0].set(bad)}
    ours, _ = optim.clip_by_global_norm(1.0).update(bad_g, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(1.0).update(bad_g, optax.EmptyState())
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.isfinite(x), np.isfinite(y)),
                 ours, theirs)


def test_multiplier_algebra_width_depth_batch_x4():
  base = metap_check.width_config(32, layers=2)
  target = metap_check.width_config(128, layers=8)
  table = _table(target, base=metap_check.base_overrides(base), tokens=(4 * 128, 4 * 128 * 10),
                 base_batch_tokens=128)
  rows = table.rows

  def check(path, init, lr, eps):
    r = rows[path]
    np.testing.assert_allclose(r.init, init, rtol=1e-12, err_msg=path)
    np.testing.assert_allclose(r.lr, lr, rtol=1e-12, err_msg=path)
    np.testing.assert_allclose(r.eps, eps, rtol=1e-12, err_msg=path)
    if r.cls != "vector":  # decay timescale: lr_p * wd_p == 1
      np.testing.assert_allclose(np.multiply(r.lr, r.wd), 1.0, rtol=1e-12, err_msg=path)
  check("blocks/0/q", 1 / 2, 1 / 4, 1 / 16)            # hidden: m_in 4, in a block: eps x m_L^-1
  check("blocks/1/moe/gate", 1 / 2, 1 / 4, 1 / 16)     # each expert: fan-in d only
  check("blocks/0/o", 1 / 8, 1 / 16, 1 / 4)            # branch output: x m_L^-1 absorbed
  check("blocks/1/moe/down", 1 / 8, 1 / 16, 1 / 4)
  check("blocks/1/moe/router", 1 / 2, 1 / 4, 1 / 16)
  check("lm_head", 1 / 4, 1 / 4, 1 / 4)                # readout
  check("embed", 1, 1, 1 / 4)
  check("blocks/0/attn_norm", 1, 1, 1 / 16)
  check("final_norm", 1, 1, 1 / 4)
  g = table.optim                                       # batch x4
  np.testing.assert_allclose([g.lr, g.eps, g.weight_decay, 1 - g.b1, 1 - g.b2],
                             [2 * OPT.lr, OPT.eps / 2, 2 * OPT.weight_decay, 4 * (1 - OPT.b1),
                              4 * (1 - OPT.b2)], rtol=1e-12)
  sp = _table(target, "sp", base=metap_check.base_overrides(base), base_batch_tokens=128)
  assert all(set(r.lr) == {1.0} and set(r.init) == {1.0} for r in sp.rows.values())
  assert sp.optim == OPT


def test_per_expert_factors_do_not_depend_on_the_expert_count():
  rows = {e: _table(metap_check.width_config(128, experts=e)).rows for e in (2, 4, 16)}
  for path in rows[4]:
    if "/moe/" in path:
      assert rows[2][path] == rows[4][path] == rows[16][path], path


def test_depth_constants_follow_relative_depth():
  cfg = metap_check.width_config(32, layers=8)
  table = _table(cfg, base=dict(BASE, num_hidden_layers=8),
                 constants={"attn_nope": {"lr": [1.0, 2.0]}, "router": {"init": 0.5}})
  assert table.rows["blocks/1/q"].lr == (1.0, 1.0, 2.0, 2.0)  # layers 1 3 | 5 7 of 0..7
  assert table.rows["blocks/0/q"].lr == (1.0,) * 4
  assert set(table.rows["blocks/1/moe/router"].init) == {0.5}
  lr = metap.tree(table, cfg, "lr")["blocks"][1]["q"]
  assert lr.shape == (4, 1, 1, 1) and lr.ravel().tolist() == [1, 1, 2, 2]


def test_init_statistics_follow_the_table():
  for width in (64, 256):
    cfg = metap_check.width_config(width, init_std=0.1)
    table = _table(cfg)
    params = jax.jit(lambda k: metap.init_params(cfg, table, k))(jax.random.key(1))
    m = width / 32
    for path, want in (("blocks/0/q", 0.1 / m ** 0.5), ("blocks/1/moe/up", 0.1 / m ** 0.5),
                       ("lm_head", 0.1 / m), ("embed", 0.1), ("blocks/0/o", 0.1 / m ** 0.5)):
      x = params
      for k in path.split("/"):
        x = x[int(k)] if k.isdigit() else x[k]
      x = np.asarray(x)
      assert x.size >= 4096 and 0.97 < x.std() / want < 1.03, (width, path, x.std(), want)
    assert (np.asarray(params["final_norm"]) == 1).all()


def test_first_adam_step_is_lr_times_multiplier_times_sign():
  cfg = metap_check.width_config(128, layers=4)
  opt = dataclasses.replace(OPT, eps=1e-30)
  table = _table(cfg, base=dict(BASE, num_hidden_layers=2), opt=opt,
                 constants={"ffn_shared": {"lr": 3.0}})
  params = jax.jit(lambda k: metap.init_params(cfg, table, k))(jax.random.key(0))
  grads = jax.jit(lambda: jax.tree.map(lambda x: jax.random.normal(jax.random.key(7), x.shape),
                                       params))()
  tx, lr = optim.make(opt, cfg, 10, (), table)
  updates = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)
  lr_tree, wd_tree = metap.tree(table, cfg, "lr"), metap.tree(table, cfg, "wd")
  decay = optim.decay_mask(cfg)
  g = table.optim
  for u, gr, p, c, w, on in zip(*map(jax.tree.leaves, (updates, grads, params, lr_tree, wd_tree,
                                                     decay))):
    want = -g.lr * c * (np.sign(gr) + (w * g.weight_decay * np.asarray(p) if on else 0))
    np.testing.assert_allclose(np.asarray(u), want, rtol=1e-5, atol=1e-12)
  assert float(lr(0)) == np.float32(g.lr)  # warmup 0: the peak from the first step
  assert set(table.rows["blocks/1/moe/shared_up"].lr) == {3.0 / 4}


def test_restoring_under_another_proxy_is_an_error(tmp_path):
  cfg = metap_check.width_config(64)
  ckpt = checkpoint.Checkpointer(tmp_path, CheckpointConfig(), {})
  ckpt.agree("metap.json", _table(cfg).key)
  ckpt.agree("metap.json", _table(cfg).key)  # the same proxy resumes
  with pytest.raises(ValueError, match=r"trained with different \['base_text.hidden_size', "
                                       r"'base_text.num_attention_heads'\] \(saved \[32, 2\], now \[48, 3\]\)"):
    ckpt.agree("metap.json", _table(cfg, base=dict(BASE, hidden_size=48, num_attention_heads=3)).key)
  with pytest.raises(ValueError, match=r"different \['depth_alpha', 'preset'\]"):
    ckpt.agree("metap.json", _table(cfg, "sp").key)
  ckpt.close()


def test_bad_metap_recipes_name_the_key():
  with pytest.raises(ConfigError, match="metap.preset='mu'"):
    load(None, ("metap.preset=mu",))
  with pytest.raises(ConfigError, match="metap.constants.attention: unknown module"):
    load(None, ("metap.constants={attention: {lr: 2}}",))
  with pytest.raises(ConfigError, match=r"metap.constants.router.lr: expected a number >= 0"):
    load(None, ("metap.constants={router: {lr: [-1]}}",))
  cfg = metap_check.width_config(64)
  with pytest.raises(ConfigError, match=r"unknown key\(s\) \['hidden'\] in metap.base"):
    _table(cfg, base={"hidden": 3})
  with pytest.raises(ValueError, match="keep the same layer pattern"):
    _table(cfg, base=dict(BASE, num_hidden_layers=1))
  with pytest.raises(ValueError, match="batch rule gives optim.b1"):
    _table(cfg, tokens=(128 * 16, 128 * 160), base_batch_tokens=128)


def test_a_run_refuses_to_resume_under_another_proxy(tmp_path):
  from train import loop, params as params_lib
  proxy = "metap.base={hidden_size: 32, num_attention_heads: 2, intermediate_size: 20}"
  quickstart = Path(__file__).parent.parent / "configs" / "quickstart.yaml"
  small = (f"workdir={tmp_path}", "steps=2", "data.synthetic.num_examples=64")
  cfg = load(quickstart, (*small, "metap.preset=mup", proxy))
  table = params_lib.resolve_table(cfg, cfg.model.build())
  assert table.rows["blocks/0/q"].lr == (0.5,)
  (tmp_path / "checkpoints").mkdir()
  other = load(quickstart, small)
  (tmp_path / "checkpoints" / "metap.json").write_text(
      json.dumps(params_lib.resolve_table(other, other.model.build()).key))
  with pytest.raises(ValueError, match=r"checkpoints were trained with different \['base_text\.\w+', "
                                       r".*'depth_alpha', 'preset'\]"):
    loop.run(cfg)
