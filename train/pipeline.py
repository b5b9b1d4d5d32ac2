"""Staged training: `llama4-train PIPELINE.yaml` runs stages in order (pretrain -> mid-train -> SFT
-> RL -> DPO), each starting from the previous stage's last checkpoint, and measures each stage's
own figure before and after it.

    pipeline:
      workdir: workdirs/tiny_pipeline     # stage NAME trains in WORKDIR/NAME
      eval_examples: 128                  # held-out examples per measure
      lm_eval: {tasks: [my_task], include_path: tasks/, limit: 200}   # optional, every stage
      base: {model: ..., data: ...}       # recipe keys every stage shares
      stages:
        - {name: pretrain, steps: 300, ...}   # recipe keys of this stage, merged over base
        - {name: sft, data: {chat: true}, ...}

A stage without `model.init_from_checkpoint` starts from the previous stage's final step. Running
the same command again resumes: finished stages (WORKDIR/NAME/stage.json) are skipped, an
interrupted stage resumes from its own checkpoints. Every stage is a plain recipe: its
WORKDIR/NAME/recipe.yaml reruns it alone. Measures (each stage's `measure`, train/stages/, and
lm-eval's metrics on `lm_eval.tasks` when that is set, train/harness.py) go to stage.json and the
summary table printed at the end.
"""
import copy
import dataclasses
import json
from pathlib import Path

import yaml

from train import config as config_lib
from train.config import ConfigError, RunConfig


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """The `pipeline:` section (see the module docstring)."""
  stages: tuple[dict, ...] = ()
  workdir: str = "workdirs/pipeline"
  eval_examples: int = 128
  base: dict = dataclasses.field(default_factory=dict)
  lm_eval: dict = dataclasses.field(default_factory=dict)  # {tasks, include_path?, limit?, batch_size?}

  def __post_init__(self):
    if not self.stages:
      raise ValueError("pipeline.stages: at least one stage is required")
    if self.eval_examples < 1:
      raise ValueError(f"pipeline.eval_examples={self.eval_examples}: must be >= 1")
    unknown = sorted(set(self.lm_eval) - {"tasks", "include_path", "limit", "batch_size"})
    if unknown or (self.lm_eval and not self.lm_eval.get("tasks")):
      raise ValueError(f"pipeline.lm_eval: {f'unknown key(s) {unknown}' if unknown else 'no tasks'}; "
                       f"expected {{tasks: [...], include_path?, limit?, batch_size?}}")


def section(d: dict) -> PipelineConfig:
  """The typed `pipeline:` section of a YAML mapping."""
  if not isinstance(d.get("pipeline"), dict):
    raise ConfigError("pipeline: expected a mapping with keys "
                      f"{[f.name for f in dataclasses.fields(PipelineConfig)]}")
  return config_lib.from_dict(PipelineConfig, d["pipeline"], "pipeline")


def _merge(base: dict, over: dict) -> dict:
  out = copy.deepcopy(base)
  for k, v in over.items():
    out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def stages(d: dict, overrides: tuple[str, ...] = ()) -> list[tuple[str, RunConfig]]:
  """[(name, recipe)] of a `pipeline:` mapping; each recipe checked as a RunConfig."""
  p = section(d)
  base = copy.deepcopy(p.base)
  for o in overrides:  # --set applies to every stage
    config_lib.apply_override(base, o)
  workdir = Path(p.workdir)
  out, previous = [], None
  for i, s in enumerate(p.stages):
    if not isinstance(s, dict) or not isinstance(s.get("name"), str):
      raise ConfigError(f"pipeline.stages[{i}]: expected a mapping with a name")
    name = s["name"]
    if name in [n for n, _ in out]:
      raise ConfigError(f"pipeline.stages[{i}]: the name {name!r} is used twice")
    recipe = _merge(base, {k: v for k, v in s.items() if k != "name"})
    recipe["workdir"] = str(workdir / name)
    model = recipe.setdefault("model", {})
    if previous is not None and not model.get("init_from_checkpoint") and not model.get("init_from_hf"):
      model["init_from_checkpoint"] = str(workdir / previous[0] / "checkpoints" / str(previous[1]))
    try:
      cfg = config_lib.from_dict(RunConfig, recipe)
    except ConfigError as e:
      raise ConfigError(f"pipeline.stages[{i}] ({name}): {e}") from e
    out.append((name, cfg))
    previous = (name, cfg.steps)
  return out


def run(d: dict, overrides: tuple[str, ...] = (), step_cache: Path | None = None) -> list[dict]:
  """Runs (or resumes) every stage; returns each stage's summary. `step_cache`: as `loop.run`'s."""
  from train import loop, params, stages as stages_lib  # jax: once the recipe is known valid
  plan = stages(d, overrides)
  summaries = []
  for name, cfg in plan:
    workdir = Path(cfg.workdir)
    done = workdir / "stage.json"
    if done.is_file():
      print(f"[pipeline] {name}: done ({done})")
      summaries.append(json.loads(done.read_text()))
      continue
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "recipe.yaml").write_text(yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False))
    print(f"[pipeline] {name}: {cfg.steps} steps in {workdir}")
    stage, start = stages_lib.for_recipe(cfg), params.starting_params(cfg)
    before = _measure(section(d), cfg, stage, start, start=start)
    del start  # not held on the device while the stage trains
    # SIGTERM raises workdir.Interrupted: a rerun resumes this stage
    record = loop.run(cfg, step_cache)
    after = _measure(section(d), cfg, stage, params.final_params(cfg))
    summary = {"stage": name, "steps": cfg.steps, "before": before, "after": after,
               "final_train_loss": record.get("loss")}
    done.write_text(json.dumps(summary, indent=2))
    summaries.append(summary)
  print(format_summaries(summaries))
  return summaries


def _measure(p: PipelineConfig, cfg: RunConfig, stage, model_params, start=None) -> dict:
  """The stage's own measure, and lm-eval's metrics when `pipeline.lm_eval` is set."""
  out = stage.measure(model_params, p.eval_examples, start=start)
  if p.lm_eval:
    from train import harness, tokenizer as tokenizer_lib
    model_cfg = cfg.model.build()
    tasks = p.lm_eval["tasks"]
    out.update(harness.measure(model_cfg, model_params, tokenizer_lib.for_model(cfg.data, model_cfg),
                               [tasks] if isinstance(tasks, str) else tasks,
                               p.lm_eval.get("include_path"), p.lm_eval.get("limit"),
                               p.lm_eval.get("batch_size", 8)))
  return out


def format_summaries(summaries: list[dict]) -> str:
  lines = ["stage        measure                       before      after"]
  for s in summaries:
    for k in s["before"]:
      lines.append(f"{s['stage']:12s} {k:28s} {s['before'][k]:9.4f}  {s['after'][k]:9.4f}")
  return "\n".join(lines)

