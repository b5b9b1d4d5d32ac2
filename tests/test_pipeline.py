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
])
def test_a_bad_pipeline_section_is_one_error_naming_it(section, culprit):
  with pytest.raises(config_lib.ConfigError, match=culprit):
    pipeline.stages({"pipeline": section})
