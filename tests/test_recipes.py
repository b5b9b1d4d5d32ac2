"""Recipes: every YAML in configs/ parses strictly and its model builds (eval_shape, no memory)."""
import dataclasses
import json
from pathlib import Path

import jax
import pytest

import llama4_jax as l4
from llama4_jax import config as config_lib
from train import __main__ as cli, config as run_config, loop, params as params_lib, pipeline, step as step_lib

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_recipe_parses_and_model_builds(path):
  header = [l for l in path.read_text().splitlines() if l.startswith("#")]
  command = f"llama4-train configs/{path.relative_to(ROOT / 'configs')}"
  assert any(command in l for l in header), f"the leading comment should give `{command}`"
  recipe = run_config.read_yaml(path)
  if "pipeline" in recipe:  # every stage is a recipe, each starting from the one before
    stages = pipeline.stages(recipe)
    for (_, before), (_, cfg) in zip(stages, stages[1:]):
      assert cfg.model.init_from_checkpoint == f"{before.workdir}/checkpoints/{before.steps}"
    cfgs = [cfg for _, cfg in stages]
  else:
    cfgs = [run_config.load(path)]
  for cfg in cfgs:
    _check_recipe(cfg)


def _check_recipe(cfg):
  model = cfg.model.build()
  assert l4.param_count(model) > 0
  table = params_lib.resolve_table(cfg, model)  # the MetaP proxy fits the model
  assert len(table.rows) == len(jax.tree.leaves(l4.param_specs(model), is_leaf=l4.is_spec))
  assert all(min(r.lr) > 0 for r in table.rows.values())
  assert cfg.data.batch_size % cfg.optim.grad_accum == 0


def test_released_presets_are_in_the_pod_recipes():
  # text pretraining: the released text models, without the vision tower (model.multimodal: false)
  for name in ("scout", "maverick"):
    built = run_config.load(ROOT / f"configs/{name}/pretrain.yaml").model.build()
    assert built == dataclasses.replace(getattr(l4.presets, name)(), vision=None)


def test_unknown_key_lists_valid_keys_and_wrong_type_names_key(tmp_path):
  bad = tmp_path / "bad.yaml"
  bad.write_text("optim:\n  learning_rate: 0.1\n")
  with pytest.raises(run_config.ConfigError, match=r"unknown key\(s\) \['learning_rate'\] in optim; valid keys: \['lr', "):
    run_config.load(bad)
  bad.write_text("steps: many\n")
  with pytest.raises(run_config.ConfigError, match=r"steps: expected int, got str 'many'"):
    run_config.load(bad)
  with pytest.raises(run_config.ConfigError, match=r"model\.text\.hidden_size: expected int"):
    run_config.load(None, ("model.text.hidden_size=wide",)).model.build()
  assert cli.main([str(bad)]) == 2


def test_missing_data_file_fails_before_compiling(tmp_path):
  cfg = run_config.load(ROOT / "configs/quickstart.yaml",
                        (f"workdir={tmp_path}", f"data.paths=[{tmp_path}/missing.jsonl]",
                         "data.synthetic=null"))
  before = step_lib.TRACE_COUNT["train_step"]
  with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
    loop.run(cfg)
  assert step_lib.TRACE_COUNT["train_step"] == before


def test_hub_config_of_the_first_scout_release():
  """transformers 4.51's Scout config.json (from the seeds): old rope_scaling, temperature 4."""
  d = json.loads((Path(__file__).parent / "data/scout_config_hf4.51.json").read_text())
  cfg = config_lib.from_hf(d)
  assert cfg.text.rope_scaling == l4.Llama3Scaling(8.0, 1.0, 4.0, 8192)
  assert cfg.text.attn_temperature_tuning is True and cfg.vision.image_size == 336
  assert cfg.text == dataclasses.replace(
      l4.presets.scout().text, rope_scaling=l4.Llama3Scaling(8.0, 1.0, 4.0, 8192),
      max_position_embeddings=262144, moe_layers=tuple(range(48)),
      rope_layers=(True, True, True, False) * 12)
