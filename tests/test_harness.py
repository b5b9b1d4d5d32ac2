"""lm-evaluation-harness on our model (`llama4-eval`, train/harness.py): the command runs local
task files offline, and its log-likelihoods, rolling log-likelihoods and generations equal our own
forward and sampler."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama4_jax as l4
from train import chat, generate, harness, tokenizer as tokenizer_lib

TOK = tokenizer_lib.byte_tokenizer()


class Req:  # lm-eval's Instance, as far as the model reads it
  def __init__(self, *args):
    self.args = args


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  cfg, path = l4.presets.tiny(), tmp_path_factory.mktemp("model")
  params = l4.init_params(cfg, jax.random.key(2), jnp.float32)
  l4.save_hf(path, cfg, jax.tree.map(lambda w: w * 20 if w.ndim > 1 else w, params))
  chat.save_tokenizer(TOK, path)
  return path


def _our_logprob(cfg, params, ids: list[int], n_cont: int) -> float:
  logits = np.asarray(l4.forward(cfg, params, jnp.asarray([ids[:-1]])), np.float64)[0]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  return float(sum(logp[t, ids[t + 1]] for t in range(len(ids) - 1 - n_cont, len(ids) - 1)))


def test_logprobs_rolling_and_generation_equal_ours(model_dir):
  lm = harness.Llama4JaxLM(path=str(model_dir), batch_size=3)
  cfg, params = lm.cfg, lm.params
  pairs = [("12+7=", "19"), ("a longer context about numbers: 3+4=", " 7"), ("x", "yz"),
           ("q", "r")]
  got = lm.loglikelihood([Req(c, t) for c, t in pairs])
  for (ctx, cont), (lp, _) in zip(pairs, got):
    ids = [256, *TOK.encode(ctx).ids, *TOK.encode(cont).ids]
    n = len(TOK.encode(cont).ids)
    assert abs(lp - _our_logprob(cfg, params, ids, n)) <= 1e-5 * n  # 1e-5 per token
  text = "rolling text of some length, 0123456789"
  (rolled,) = lm.loglikelihood_rolling([Req(text)])
  ids = [256, *TOK.encode(text).ids]
  assert abs(rolled - _our_logprob(cfg, params, ids, len(ids) - 1)) <= 1e-5 * (len(ids) - 1)
  (out,) = lm.generate_until([Req("3+4=", {"until": ["\n"], "max_gen_toks": 6})])
  (toks,) = generate.Generator(cfg, params, TOK, 6, 0.0, 1.0)([[256, *TOK.encode("3+4=").ids]],
                                                               [None], jax.random.key(0))
  assert out == TOK.decode(toks).split("\n")[0]


def test_llama4_eval_runs_local_tasks_offline(model_dir, tmp_path, monkeypatch):
  rows = [{"prompt": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1)], "label": 0,
           "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (10, 5), (7, 7)]]
  (tmp_path / "arith.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path}/arith.jsonl\n"
            "test_split: test\ndoc_to_text: '{{prompt}}'\n")
  (tmp_path / "mc.yaml").write_text("task: arith_mc\n" + common + "output_type: multiple_choice\n"
                                    "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
                                    "metric_list:\n  - metric: acc\n")
  (tmp_path / "gen.yaml").write_text("task: arith_gen\n" + common + "output_type: generate_until\n"
                                     "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n"
                                     "  until: ['\\n']\n  max_gen_toks: 4\n"
                                     "metric_list:\n  - metric: exact_match\n")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  assert harness.main(["--model", "llama4-jax", "--model_args", f"path={model_dir}", "--batch_size", "4",
                       "--tasks", "arith_mc,arith_gen", "--include_path", str(tmp_path),
                       "--output_path", str(tmp_path / "out")]) == 0
  (result,) = list((tmp_path / "out").rglob("results_*.json"))
  res = json.loads(result.read_text())["results"]
  assert 0 <= res["arith_mc"]["acc,none"] <= 1 and 0 <= res["arith_gen"]["exact_match,none"] <= 1
  # the accuracy is what our log-likelihoods say
  lm = harness.Llama4JaxLM(path=str(model_dir))
  scores = lm.loglikelihood([Req(r["prompt"], " " + c) for r in rows for c in r["choices"]])
  want = np.mean([scores[2 * i][0] > scores[2 * i + 1][0] for i in range(len(rows))])
  assert res["arith_mc"]["acc,none"] == pytest.approx(want)
