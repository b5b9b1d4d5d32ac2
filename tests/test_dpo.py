"""DPO: log 2 at initialisation (policy == reference), sequence log-probs that count only response
tokens, a few steps on the shared train step raise preference accuracy and margin, and bad pairs
are named."""
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama4_jax as l4
from train import chat, optim, step as step_lib, tokenizer as tokenizer_lib
from train.stages import dpo
from train.config import OptimConfig

TOK = tokenizer_lib.byte_tokenizer()
CFG = l4.presets.tiny()  # the byte tokenizer's ids
PAIRS = [{"messages": [{"role": "user", "content": f"{a}+{b}="}], "chosen": str(a + b),
          "rejected": str(a + b + 1 + a % 3), "where": f"pair {a}"} for a, b in [(1, 2), (30, 4), (7, 7), (12, 40)]]


def _batch():
  render = chat.Renderer(TOK, 32)
  rows = [dpo.encode_pair(render, p) for p in PAIRS]
  return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def test_loss_is_log2_when_the_policy_is_the_reference_and_training_prefers_chosen():
  params = l4.init_params(CFG, jax.random.key(0))
  batch = _batch()
  batch["ref_logps"] = jnp.asarray(dpo.reference_logps(CFG, params, [batch]))
  tx, lr = optim.make(OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0), CFG, 10)
  train_step = jax.jit(step_lib.make_train_step(dpo.make_loss(CFG, beta=0.5), tx, lr))
  state, m0 = train_step(step_lib.init_state(params, tx), batch)
  assert abs(float(m0["loss"]) - math.log(2)) < 1e-6 and abs(float(m0["margin"])) < 1e-5
  for _ in range(4):
    state, m = train_step(state, batch)
  assert float(m["loss"]) < math.log(2) - 0.05 and float(m["margin"]) > 0.1
  assert float(m["accuracy"]) == 1.0


def test_sequence_logps_count_only_response_tokens():
  params = l4.init_params(CFG, jax.random.key(1))
  batch = _batch()
  got = np.asarray(dpo.sequence_logps(CFG, params, batch["chosen_tokens"],
                                      batch["chosen_mask"])[0])
  # causal: a row's logits before its padding do not depend on the padding
  logps = np.asarray(jax.nn.log_softmax(jax.jit(l4.forward, static_argnums=0)(
      CFG, params, batch["chosen_tokens"]), -1))
  for i in range(len(PAIRS)):
    mask = np.asarray(batch["chosen_mask"][i])
    n = int(np.flatnonzero(mask)[-1]) + 1  # the unpadded conversation
    ids = np.asarray(batch["chosen_tokens"][i:i + 1, :n])
    want = sum(float(logps[i, t - 1, ids[0, t]]) for t in range(1, n) if mask[t])
    assert abs(got[i] - want) < 1e-4
    assert TOK.decode(np.asarray(ids[0])[mask[:n] == 1].tolist(), skip_special_tokens=False) == \
        PAIRS[i]["chosen"] + "<|eot|>"


@pytest.mark.parametrize("record,msg", [
    ({"prompt": "1+1=", "chosen": "2", "rejected": ""}, "an empty preference pair: 'rejected'"),
    ({"prompt": "1+1=", "chosen": " ", "rejected": "3"}, "an empty preference pair: 'chosen'"),
    ({"prompt": "1+1=", "chosen": "2", "rejected": "2 "}, "chosen and rejected are the same"),
    ({"prompt": "1+1=", "chosen": "2"}, "expected"),
])
def test_bad_pairs_name_the_file_and_line(tmp_path, record, msg):
  path = tmp_path / "pairs.jsonl"
  good = {"prompt": "2+2=", "chosen": "4", "rejected": "5"}
  path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
  with pytest.raises(ValueError, match=rf"pairs\.jsonl:2: {msg}"):
    dpo.read_pairs(str(path))


def test_dpo_stage_in_llama4_train_starts_at_log2_and_reuses_its_reference(tmp_path):
  from pathlib import Path
  from train import config as config_lib, loop
  quickstart = Path(__file__).parent.parent / "configs" / "quickstart.yaml"
  cfg = config_lib.load(quickstart, (f"workdir={tmp_path}", "steps=2", "dpo.beta=0.5",
                                     "data.synthetic.num_examples=40", "data.seq_len=48",
                                     "data.batch_size=8", "report=false"))
  loop.run(cfg)
  first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
  assert abs(first["loss"] - math.log(2)) < 1e-6 and {"accuracy", "margin"} <= set(first)
  ref = np.load(tmp_path / "dpo_reference.npy")
  assert ref.shape == (40, 2) and np.all(ref < 0)
  pairs = tmp_path / "data" / "arithmetic-40-999-0.pairs.jsonl"
  assert len(pairs.read_text().splitlines()) == 40
  pairs.write_text("\n".join(pairs.read_text().splitlines()[:30]) + "\n")  # the data changed
  with pytest.raises(ValueError, match="holds 40 pairs' reference log-probs but the data has 30"):
    loop.run(dataclasses.replace(cfg, steps=3))
