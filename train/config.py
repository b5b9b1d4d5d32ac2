"""Run configuration: the recipe's typed frozen dataclasses, read strictly from YAML with typed
overrides (`train/schema.py`: unknown keys and wrong types are errors naming the key)."""
import dataclasses
import math
from pathlib import Path

import llama4_jax as l4
from sharding.mesh import MeshConfig
from train.ranges import at_least, fraction, positive, require
from train.schema import (ConfigError, apply_override, from_dict, read_yaml,  # noqa: F401
                          shallow_fields, to_dict)

PRESETS = {"tiny": l4.presets.tiny, "tiny_multimodal": l4.presets.tiny_multimodal,
           "scout": l4.presets.scout, "maverick": l4.presets.maverick}


@dataclasses.dataclass(frozen=True)
class ImageTokenIds:
  """The model's image token ids (`model.image_tokens`), as the tokenizer numbers them."""
  boi_token_index: int
  eoi_token_index: int
  image_token_index: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  preset: str = "tiny"                      # a function of llama4_jax.presets: tiny, scout, maverick
  text: dict = dataclasses.field(default_factory=dict)  # TextConfig field overrides
  image_tokens: dict = dataclasses.field(default_factory=dict)  # boi_token_index, eoi_token_index,
                                            #   image_token_index (the tokenizer's <|patch|>)
  init_from_hf: str | None = None           # HF directory whose weights start the run
  init_from_checkpoint: str | None = None   # or `llama4-convert hf-to-orbax`'s output (streamed),
                                            #   or a training step WORKDIR/checkpoints/STEP
  compute_dtype: str = "float32"            # float32 | bfloat16: the forward/backward
  param_dtype: str = "float32"              # float32 | bfloat16: stored params (the optimizer
  remat: bool = False                       #   state and the update math stay fp32)
  scan_layers: bool = True                  # layers as a scan over layer groups (one compiled
                                            #   group); false: unrolled, longer compiles, up
                                            #   to ~13% faster steps of small models on CPU
  attention: str = "auto"                   # auto (by the mesh's devices: TPU splash, GPU
                                            #   gpu_flash, CPU xla) | xla | splash | gpu_flash
  grouped_matmul: str = "auto"              # MoE: auto (TPU/GPU ragged_dot, CPU blocked) |
                                            #   ragged_dot | blocked
  multimodal: bool = False                  # keep the preset's vision tower (early fusion)
  freeze_vision: bool = False               # multimodal: the vision tower + adapter get no updates
  freeze_projector: bool = False            # multimodal: nor does the projector
  freeze_text: bool = False                 # multimodal: nor does the language model (aligning
                                            #   a vision tower to a frozen LLM, as Meta did)

  def __post_init__(self):
    if self.preset not in PRESETS:
      raise ValueError(f"model.preset={self.preset!r}; valid: {list(PRESETS)}")
    for key, valid in (("attention", ("auto", "xla", "splash", "gpu_flash")),
                       ("grouped_matmul", ("auto", "ragged_dot", "blocked"))):
      if getattr(self, key) not in valid:
        raise ValueError(f"model.{key}={getattr(self, key)!r}; valid: {', '.join(valid)}")
    for key in ("compute_dtype", "param_dtype"):
      if getattr(self, key) not in ("float32", "bfloat16"):
        raise ValueError(f"model.{key}={getattr(self, key)!r}; valid: float32, bfloat16")
    if self.init_from_hf is not None and self.init_from_checkpoint is not None:
      raise ValueError("model.init_from_hf and model.init_from_checkpoint are both set; pick one")
    if (self.freeze_vision or self.freeze_projector or self.freeze_text) and not self.multimodal:
      raise ValueError("model.freeze_vision/freeze_projector/freeze_text need model.multimodal: true")
    if self.multimodal and PRESETS[self.preset]().vision is None:
      raise ValueError(f"model.preset={self.preset!r} has no vision tower; multimodal presets: "
                       f"{[k for k, f in PRESETS.items() if f().vision is not None]}")

  def build(self) -> l4.Config:
    """The model Config: the preset with `text` overrides checked against TextConfig; the vision
    tower only when `multimodal`."""
    base = PRESETS[self.preset]()
    text = from_dict(l4.TextConfig, {**shallow_fields(base.text), **self.text}, "model.text")
    ids = {f.name: getattr(base, f.name) for f in dataclasses.fields(ImageTokenIds)}
    top = from_dict(ImageTokenIds, ids | self.image_tokens, "model.image_tokens")
    return dataclasses.replace(base, text=text, vision=base.vision if self.multimodal else None,
                               **dataclasses.asdict(top))

  def frozen(self) -> tuple[str, ...]:
    """Top-level param keys that are not trained."""
    text = ("embed", "blocks", "final_norm", "lm_head") if self.freeze_text else ()
    return (("vision",) if self.freeze_vision else ()) + (
        ("projector",) if self.freeze_projector else ()) + text


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """The embedded arithmetic task (train/tasks.py), written into the workdir."""
  num_examples: int = 50000
  max_operand: int = 999
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class SyntheticImagesConfig:
  """The embedded multimodal task (train/tasks.py `write_colors`), written into the workdir."""
  num_examples: int = 2000
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class DataConfig:
  paths: tuple[str, ...] = ()               # .jsonl / .parquet / .arrayrecord files (field "text")
  weights: tuple[float, ...] = ()           # mixture weights, one per path (default: equal)
  synthetic: SyntheticConfig | None = None  # use the embedded task instead of `paths`
  tokenizer: str | None = None              # Meta's tokenizer.model or a HF tokenizer.json (or a
                                            #   directory with one); None: the byte tokenizer
  special_tokens_in_text: bool = False      # text spelling a special token ("<|eot|>") is that
                                            #   control token, not plain text (Meta's default)
  seq_len: int = 128
  batch_size: int = 16                      # global batch, in packed rows
  seed: int = 0
  packing_bins: int = 16
  workers: int = 0                          # grain worker processes per host (0: in the trainer's
                                            #   process; benchmarks/data.py: one is plenty)
  chat: bool = False                        # SFT: .jsonl {"messages": [...]} in the Llama 4 chat
                                            #   format, loss on assistant turns (train/chat.py)
  # multimodal models (model.multimodal): JSONL records {"text": "...<|image|>...", "images":
  # [paths relative to the file]}, one record per row (no packing), tiles padded per row
  synthetic_images: SyntheticImagesConfig | None = None  # the embedded colour task instead
  image_tiles: int = 16                     # most tiles per image (the processor's max_tiles)
  row_tiles: int = 17                       # tiles per row: 16 + a global tile = one full image

  def __post_init__(self):
    at_least("data", self, 1, "batch_size", "packing_bins", "image_tiles", "row_tiles")
    at_least("data", self, 2, "seq_len")  # a row must hold an input and its next token
    at_least("data", self, 0, "seed", "workers")
    for i, w in enumerate(self.weights):
      if not (math.isfinite(w) and w >= 0):
        raise ValueError(f"data.weights[{i}]={w!r}: must be a finite number >= 0")
    if self.weights and not sum(self.weights) > 0:
      raise ValueError(f"data.weights={list(self.weights)}: at least one must be > 0")
    if self.weights and self.paths and len(self.weights) != len(self.paths):
      raise ValueError(f"data.weights has {len(self.weights)} entries for {len(self.paths)} "
                       f"data.paths")
    if self.synthetic is not None and self.paths:
      raise ValueError("data.synthetic and data.paths are both set; pick one")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 3e-3
  schedule: str = "cosine"                  # cosine | wsd | constant
  warmup_steps: int = 20
  decay_steps: int = 0                      # wsd: length of the final decay (0: 20% of the run)
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  grad_accum: int = 1
  z_loss: float = 0.0
  loss_chunk: int = 0                       # positions per LM-head/CE chunk (0: the whole row)
  load_balance: float = 0.0                 # coefficient of the MoE load-balance loss
  skip_nonfinite: int = 0                   # steps with a non-finite loss/gradient skipped (no
                                            #   update) before the run stops; 0: stop at the first

  def __post_init__(self):
    if self.schedule not in ("cosine", "wsd", "constant"):
      raise ValueError(f"optim.schedule={self.schedule!r}; valid: cosine, wsd, constant")
    positive("optim", self, "lr", "eps")
    at_least("optim", self, 1, "grad_accum")
    at_least("optim", self, 0, "warmup_steps", "decay_steps", "weight_decay", "clip_norm",
             "z_loss", "loss_chunk", "load_balance", "skip_nonfinite")
    fraction("optim", self, "b1", "b2")
    require("optim", self, "in [0, 1]", lambda v: 0 <= v <= 1, "min_lr_ratio")


METAP_MODULES = ("embedding", "attn_rope", "attn_nope", "ffn_dense", "ffn_expert", "ffn_shared",
                 "router", "norm", "readout", "vision", "projector")


@dataclasses.dataclass(frozen=True)
class MetaPConfig:
  """Per-tensor init/LR/decay/eps transferred from a proxy (train/metap.py)."""
  preset: str = "sp"                    # sp: standard (every factor 1) | mup: muP width + CompleteP
                                        #   depth + Adam batch rule
  base: dict = dataclasses.field(default_factory=dict)         # TextConfig overrides: the proxy
  base_vision: dict = dataclasses.field(default_factory=dict)  # VisionConfig overrides: the proxy
  base_batch_tokens: int | None = None  # tokens per optimizer step of the proxy (None: this run's)
  base_train_tokens: int | None = None  # tokens the proxy trained on (None: this run's)
  depth_alpha: float = 1.0              # mup: residual branches x (L0/L)^alpha, absorbed in init/LR
  duration_exponent: float = 0.0        # LR x (D/D0)^-exponent, fitted from proxies at 2+ horizons
  constants: dict = dataclasses.field(default_factory=dict)    # {module: {lr: x | [x per depth
                                                               #   bucket], init: ...}}

  def __post_init__(self):
    if self.preset not in ("sp", "mup"):
      raise ValueError(f"metap.preset={self.preset!r}; valid: sp, mup")
    for module, c in self.constants.items():
      if module not in METAP_MODULES:
        raise ValueError(f"metap.constants.{module}: unknown module; valid: {list(METAP_MODULES)}")
      if not isinstance(c, dict) or set(c) - {"lr", "init"}:
        raise ValueError(f"metap.constants.{module} must map lr/init to a number or a list, got {c!r}")
      for k, v in c.items():
        values = v if isinstance(v, (list, tuple)) else [v]
        if not values or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0
                                 for x in values):
          raise ValueError(f"metap.constants.{module}.{k}: expected a number >= 0 or a non-empty "
                           f"list of them, got {v!r}")
    for name in ("base_batch_tokens", "base_train_tokens"):
      if getattr(self, name) is not None and getattr(self, name) <= 0:
        raise ValueError(f"metap.{name} must be positive, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 100
  keep: int = 2                             # newest checkpoints kept (>= 1: one always stays)
  async_save: bool = True

  def __post_init__(self):
    at_least("checkpoint", self, 1, "every", "keep")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """Preference training (train/stages/dpo.py): data.paths are {"prompt", "chosen", "rejected"} JSONL;
  the reference is the starting policy, its log-probs computed once into the workdir."""
  beta: float = 0.1

  def __post_init__(self):
    if self.beta <= 0:
      raise ValueError(f"dpo.beta must be positive, got {self.beta}")


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """Online RL, GRPO-style (train/stages/rl.py): data.paths are {"prompt", "answer"} JSONL (or the
  embedded task); data.batch_size rows per step = prompts x group_size."""
  group_size: int = 8                       # completions sampled per prompt
  max_new_tokens: int = 8                   # completion length (data.seq_len covers prompt + it)
  temperature: float = 1.0                  # 0: greedy
  top_p: float = 1.0
  clip_eps: float = 0.2                     # PPO ratio clip
  kl_coef: float = 0.02                     # k3 KL to the reference (the starting policy)
  max_rounds: int = 4                       # sampling rounds per step to fill the batch with
                                            #   prompts whose group rewards differ

  def __post_init__(self):
    if self.group_size < 2:
      raise ValueError(f"rl.group_size must be >= 2 (advantages are group-relative), got "
                       f"{self.group_size}")
    if self.temperature < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"rl.temperature must be >= 0 and rl.top_p in (0, 1], got "
                       f"{self.temperature}, {self.top_p}")
    if self.max_new_tokens < 1 or self.max_rounds < 1 or self.clip_eps <= 0 or self.kl_coef < 0:
      raise ValueError("rl.max_new_tokens and rl.max_rounds must be >= 1, rl.clip_eps > 0 and "
                       "rl.kl_coef >= 0")


LORA_TARGETS = l4.BLOCK_MATMULS + ("router",)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA / QLoRA (train/lora.py): only adapters train; the base is frozen (int4 when quantize)."""
  rank: int = 16
  alpha: float = 32.0                       # adapters scaled by alpha / rank
  targets: tuple[str, ...] = l4.BLOCK_MATMULS  # block weights: gate/up/down = dense MLP and
                                            #   every routed expert; shared_* = the shared expert
  quantize: bool = False                    # QLoRA: frozen block matrices in int4
  group_size: int = 64                      # int4 values per bf16 scale (along the last axis)

  def __post_init__(self):
    if self.rank < 1 or self.alpha <= 0:
      raise ValueError(f"lora.rank must be >= 1 and lora.alpha > 0, got {self.rank}, {self.alpha}")
    bad = sorted(set(self.targets) - set(LORA_TARGETS))
    if bad or not self.targets:
      raise ValueError(f"lora.targets: unknown {bad or 'none given'}; valid: {list(LORA_TARGETS)}")
    if self.group_size < 2 or self.group_size % 2:
      raise ValueError(f"lora.group_size must be an even number >= 2, got {self.group_size}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  workdir: str = "workdirs/quickstart"
  steps: int = 300
  seed: int = 0
  log_every: int = 10  # metrics.jsonl + TensorBoard: every N-th step, the last and non-finite ones
  peak_flops_per_device: float | None = None  # None: from the device kind, or measured on CPU
  report: bool = True                          # write report.png at the end
  # jax's persistent compilation cache for `llama4-train` (relative to workdir, or absolute; null:
  # off): a restart after preemption reads its programs back instead of compiling them
  compile_cache: str | None = "compile_cache"
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  metap: MetaPConfig = MetaPConfig()
  dpo: DPOConfig | None = None              # set: DPO on preference pairs instead of next-token loss
  lora: LoraConfig | None = None            # set: train LoRA/QLoRA adapters on a frozen base
  rl: RLConfig | None = None                # set: online RL on sampled completions (GRPO)
  checkpoint: CheckpointConfig = CheckpointConfig()
  mesh: MeshConfig = MeshConfig(data=-1)  # all devices data-parallel

  def __post_init__(self):
    at_least("run", self, 1, "steps", "log_every")
    at_least("run", self, 0, "seed")
    positive("run", self, "peak_flops_per_device")
    if self.data.batch_size % self.optim.grad_accum:
      raise ValueError(f"data.batch_size={self.data.batch_size} is not divisible by "
                       f"optim.grad_accum={self.optim.grad_accum}")
    if self.dpo is not None and self.rl is not None:
      raise ValueError("dpo and rl are both set: a run is one stage")
    if self.rl is not None and self.lora is not None:
      raise ValueError("rl with lora: RL trains the full model in this version")
    if (self.dpo is not None or self.rl is not None) and self.data.chat:
      raise ValueError("data.chat is for SFT; dpo/rl render their own chat prompts")


def load(path: str | Path | None, overrides: tuple[str, ...] = ()) -> RunConfig:
  """Reads a YAML recipe (None: all defaults) and applies `--set` overrides."""
  d: dict = read_yaml(path) if path is not None else {}
  for o in overrides:
    apply_override(d, o)
  return from_dict(RunConfig, d)
