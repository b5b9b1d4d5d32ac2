"""Online RL (GRPO): the sampler at temperature 0 is greedy decoding with the full forward,
rollouts are a function of the seed and step, groups with equal rewards are filtered, a reward
function that raises is counted and one returning NaN is named, and the loss starts as the
policy gradient with zero KL."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama4_jax as l4
from train import tokenizer as tokenizer_lib
from train.stages import rl
from train.config import DataConfig, RLConfig

TOK = tokenizer_lib.byte_tokenizer()
CFG = l4.presets.tiny()  # the byte tokenizer's ids
RCFG = RLConfig(group_size=4, max_new_tokens=4)
DCFG = DataConfig(seq_len=36, batch_size=8)
RECORDS = [rl.check_prompt({"prompt": f"{a}+{b}=", "answer": str(a + b)}, f"r{i}")
           for i, (a, b) in enumerate([(1, 2), (30, 4), (7, 7), (12, 40), (5, 5), (9, 1)])]


@pytest.fixture(scope="module")
def params():
  return l4.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def rollouts(params):
  # a random model never answers right: a reward it does vary on keeps the groups
  return rl.Rollouts(CFG, RCFG, DCFG, RECORDS, TOK, params,
                     reward_fn=lambda rec, text: float(len(text) % 2))


def test_temperature_zero_sampling_is_greedy_decoding_with_the_full_forward(params):
  ids = np.array([[0, 0, 0, 5, 6, 7], [0, 9, 8, 7, 6, 5]], np.int32)
  mask = (np.arange(6)[None] >= np.array([[3], [1]])).astype(np.int32)  # left padding
  sample = jax.jit(lambda p, k, t, top_p: l4.decode.generate(CFG, p, ids, mask, k, 5, t, top_p),
                   static_argnums=(2, 3))
  toks, live = (np.asarray(a) for a in sample(params, jax.random.key(1), 0.0, 1.0))
  # greedy: every new token is the argmax of the full forward over everything before it
  seq = np.concatenate([ids, toks], 1)
  full = l4.forward(CFG, params, seq, np.concatenate([mask, np.ones_like(toks)], 1))
  np.testing.assert_array_equal(np.asarray(jnp.argmax(full[:, 5:-1], -1)), toks)
  assert np.all(live == 1)
  # a nucleus this small keeps only the top token: sampling at temperature 1 is greedy too
  np.testing.assert_array_equal(np.asarray(sample(params, jax.random.key(2), 1.0, 1e-6)[0]), toks)


def test_rollouts_are_deterministic_in_seed_and_step(rollouts, params):
  state = rollouts.get_state()
  a, stats_a = rollouts.next_batch(params, step=3)
  rollouts.set_state(state)
  b, stats_b = rollouts.next_batch(params, step=3)
  rollouts.set_state(state)
  c, _ = rollouts.next_batch(params, step=4)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert stats_a == stats_b and not np.array_equal(a["tokens"], c["tokens"])
  assert a["tokens"].shape == (8, 36) and a["completion_mask"][:, :32].sum() == 0


def test_groups_with_equal_rewards_are_filtered():
  rewards = np.array([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 0]], np.float32)
  adv, kept = rl.advantages(rewards)
  np.testing.assert_array_equal(kept, [True, False, False, True])
  np.testing.assert_allclose(adv[0], [1, -1, -1, 1], atol=1e-5)
  np.testing.assert_allclose(adv[3].sum(), 0, atol=1e-5)


def test_every_prompt_filtered_leaves_zero_weight_rows_and_counts(params):
  r = rl.Rollouts(CFG, RCFG, DCFG, RECORDS, TOK, params, reward_fn=lambda rec, text: 1.0)
  batch, stats = r.next_batch(params, step=0)
  assert batch["completion_mask"].sum() == 0 and stats["filled_rows"] == 0
  assert stats["filtered_prompts"] == 2 * RCFG.max_rounds and stats["reward"] == 1.0


def test_a_raising_reward_is_counted_and_a_nan_reward_is_named(params):
  def flaky(record, text):
    if record["answer"] == "34":
      raise RuntimeError("boom")
    return float(len(text) % 2)
  r = rl.Rollouts(CFG, RCFG, DCFG, RECORDS, TOK, params, reward_fn=flaky)
  _, stats = r.next_batch(params, step=0)
  assert stats["reward_errors"] >= 1 and math.isfinite(stats["reward"])
  r = rl.Rollouts(CFG, RCFG, DCFG, RECORDS, TOK, params, reward_fn=lambda rec, t: float("nan"))
  with pytest.raises(ValueError, match=r"r\d: the reward function returned nan"):
    r.next_batch(params, step=0)
  with pytest.raises(ValueError, match="line9.*'prompt', 'answer'"):
    rl.check_prompt({"prompt": "1+1="}, "line9")


def test_the_loss_starts_as_the_policy_gradient_with_zero_kl(rollouts, params):
  batch, _ = rollouts.next_batch(params, step=7)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  total, (n, m) = jax.jit(rl.make_loss(CFG, RCFG))(params, batch)
  tokens = batch["completion_mask"].sum(1)
  want = -float(jnp.sum(batch["advantages"] * tokens))
  assert float(n) == float(tokens.sum()) > 0
  assert abs(float(total) - want) < 1e-3 * max(1.0, abs(want))
  assert abs(float(m["kl_sum"])) < 1e-4 and float(m["clipped_sum"]) == 0
