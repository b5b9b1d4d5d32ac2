"""Training stages: what differs between language-model training (pretraining, mid-training, SFT;
text or image-text: `lm`), DPO (`dpo`) and RL (`rl`). Everything else (the loop, THE train step,
checkpoints, metrics, LoRA, which composes with any stage) is shared and knows no stage.

A stage (`base.Stage`) gives its loss, its batches (`base.Batches`), the abstract batch
`llama4-plan` compiles against, and its own measure for the pipeline. `for_recipe` is the one
place a recipe picks its stage: a stage with its own recipe section is one line of STAGES.
"""
from train.config import RunConfig
from train.stages import dpo, lm, rl
from train.stages.base import Batches, HostBatches, Stage, held_out

STAGES = (("dpo", dpo.Stage), ("rl", rl.Stage))  # (recipe section, stage); otherwise lm.Stage


def for_recipe(cfg: RunConfig) -> Stage:
  """The stage of a recipe: the one whose section it sets, else language-model training."""
  return next((stage(cfg) for key, stage in STAGES if getattr(cfg, key) is not None),
              lm.Stage(cfg))


__all__ = ["Batches", "HostBatches", "STAGES", "Stage", "dpo", "for_recipe", "held_out", "lm", "rl"]
