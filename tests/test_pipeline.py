"""The staged pipeline: each stage starts from the previous stage's last step (through a LoRA
merge), records its measure before and after, and a rerun resumes at the first unfinished stage."""
import json

import pytest
import yaml

from train import config as config_lib, pipeline
from train_util import TINY

BASE = {k: v for k, v in TINY.items() if k not in ("steps",)}
STAGES = [  # (SFT, LoRA and DPO stages chain the same way: tests/test_lora.py, test_train.py)
    {"name": "pretrain", "steps": 4},
    {"name": "rl", "steps": 2, "data": {"seq_len": 40, "batch_size": 8},
     "rl": {"group_size": 4, "max_new_tokens": 4}},
]


def _pipeline(tmp_path, stages):
  return {"pipeline": {"workdir": str(tmp_path / "p"), "eval_examples": 8,
                       "base": {**BASE, "checkpoint": {"every": 2, "keep": 1}}, "stages": stages}}


@pytest.mark.slow
def test_stages_chain_measure_and_resume(tmp_path, capsys):
  first = pipeline.run(_pipeline(tmp_path, STAGES[:1]))  # stops after pretraining
  assert [s["stage"] for s in first] == ["pretrain"]
  pre = first[0]
  assert pre["after"]["loss_at_seq_len_32"] < pre["before"]["loss_at_seq_len_32"]
  capsys.readouterr()
  summaries = pipeline.run(_pipeline(tmp_path, STAGES))  # the rerun: done stages are skipped
  out = capsys.readouterr().out
  assert "pretrain: done" in out and "rl: 2 steps" in out
  rl = json.loads((tmp_path / "p/rl/stage.json").read_text())
  assert summaries[-1] == rl and set(rl["after"]) == {"greedy_reward", "sampled_reward",
                                                    "held_out_greedy_reward"}
  metrics = [json.loads(l) for l in (tmp_path / "p/rl/metrics.jsonl").read_text().splitlines()]
  assert len(metrics) == 2 and {"reward", "filtered_prompts", "kl"} <= set(metrics[-1])
  rl_recipe = yaml.safe_load((tmp_path / "p/rl/recipe.yaml").read_text())
  assert rl_recipe["model"]["init_from_checkpoint"] == str(tmp_path / "p/pretrain/checkpoints/4")


def test_a_bad_stage_is_named_before_anything_runs(tmp_path):
  bad = _pipeline(tmp_path, [STAGES[0], {"name": "sft", "steps": 2, "optim": {"learnig_rate": 1}}])
  with pytest.raises(config_lib.ConfigError, match=r"stages\[1\] \(sft\).*learnig_rate"):
    pipeline.stages(bad)
  assert not (tmp_path / "p").exists()
  with pytest.raises(config_lib.ConfigError, match="used twice"):
    pipeline.stages(_pipeline(tmp_path, [STAGES[0], STAGES[0]]))


@pytest.mark.parametrize("section,culprit", [
    ({"stages": []}, "pipeline.stages: at least one stage"),
    ({"stages": [{"name": "a"}], "eval_examples": 0}, "pipeline.eval_examples=0"),
    ({"stages": [{"name": "a"}], "evals": 3}, r"unknown key\(s\) \['evals'\] in pipeline"),
    ({"stages": [{"name": "a"}], "eval_examples": "many"}, "pipeline.eval_examples: expected int"),
    ("stages", "pipeline: expected a mapping"),
    ({"stages": [{"name": "a"}], "lm_eval": {"task": "x"}}, r"pipeline.lm_eval: unknown key"),
    ({"stages": [{"name": "a"}], "lm_eval": {"limit": 3}}, r"pipeline.lm_eval: no tasks"),
])
def test_a_bad_pipeline_section_is_one_error_naming_it(section, culprit):
  with pytest.raises(config_lib.ConfigError, match=culprit):
    pipeline.stages({"pipeline": section})


@pytest.mark.slow
def test_lm_eval_is_a_stage_measure(tmp_path, monkeypatch):
  rows = [{"prompt": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1)]}
          for a, b in [(1, 2), (3, 4), (10, 5), (7, 7), (20, 2), (9, 9)]]
  (tmp_path / "arith.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (tmp_path / "mc.yaml").write_text(
      f"task: arith_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
      f"    test: {tmp_path}/arith.jsonl\ntest_split: test\ndoc_to_text: '{{{{prompt}}}}'\n"
      "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\ndoc_to_target: 0\n"
      "metric_list:\n  - metric: acc\n")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  d = _pipeline(tmp_path, [{"name": "pretrain", "steps": 2}])
  d["pipeline"]["lm_eval"] = {"tasks": ["arith_mc"], "include_path": str(tmp_path), "batch_size": 4}
  (summary,) = pipeline.run(d)
  # the measure is what lm-eval's model class says of the stage's final params
  from train import harness, params, tokenizer as tokenizer_lib
  cfg = pipeline.stages(d)[0][1]
  lm = harness.Llama4JaxLM.from_params(cfg.model.build(), params.final_params(cfg),
                                       tokenizer_lib.for_model(cfg.data, cfg.model.build()))
  pairs = [([lm.ids.begin, *lm._encode(r["prompt"])], lm._encode(" " + c))
           for r in rows for c in r["choices"]]
  scores = [s for s, _ in lm.token_logprobs(pairs)]
  want = sum(scores[2 * i] > scores[2 * i + 1] for i in range(len(rows))) / len(rows)
  assert summary["after"]["lm_eval/arith_mc/acc"] == pytest.approx(want)
  assert 0 <= summary["before"]["lm_eval/arith_mc/acc"] <= 1
