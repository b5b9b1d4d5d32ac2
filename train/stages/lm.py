"""Language-model training: next-token cross-entropy (+ optional z-loss and MoE load balance) on
packed rows. One stage for pretraining and mid-training (text), SFT (`data.chat`: the loss on the
assistant's tokens only) and image-text training (a multimodal model: mmdata's rows with tiles)."""
from pathlib import Path

import jax
import jax.numpy as jnp

import llama4_jax as l4
from train import chat, data, losses, mmdata, tokenizer as tokenizer_lib
from train.stages.base import HostBatches, held_out, host


def forward(model_cfg: l4.Config, params, batch: dict, remat: bool, hooks: l4.Hooks) -> l4.Output:
  """The model on a packed batch, without the LM head. A multimodal batch carries pixel_values
  [B, tiles, C, S, S]: row b's image-token positions take its own tiles' features in order (zero
  tiles may pad rows to one tile count)."""
  return l4.apply(model_cfg, params, batch["tokens"], None, batch.get("pixel_values"),
                  positions=batch["positions"], segment_ids=batch["segment_ids"], remat=remat,
                  hooks=hooks, with_head=False)


def cast(params, dtype):
  """Floating leaves in `dtype`; integer ones (QLoRA's packed int4) as they are."""
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                      params)


def make_loss(model_cfg: l4.Config, compute_dtype, remat: bool, z_loss: float,
              load_balance: float, hooks: l4.Hooks = l4.Hooks(), loss_chunk: int = 0,
              frozen: tuple[str, ...] = ()):
  """loss_fn(params, batch) -> (summed loss, (target count, metrics)). loss_chunk > 0 computes the
  LM head and cross-entropy that many positions at a time (no [B, T, V] logits held). `frozen`
  top-level params get no gradient computed (the optimizer keeps them unchanged)."""
  k = model_cfg.text.num_experts_per_tok

  def loss_fn(params, batch):
    params = {n: jax.lax.stop_gradient(v) if n in frozen else v for n, v in params.items()}
    # params are the optimizer's copy (fp32 or bf16); the forward runs in compute_dtype
    p = cast(params, compute_dtype)
    out = forward(model_cfg, p, batch, remat, hooks)
    targets, weights = losses.next_token_targets(batch)
    total, metrics = losses.chunked_cross_entropy(lambda x: l4.model.head(model_cfg.text, p, x),
                                                  out.final, targets, weights, z_loss, loss_chunk)
    n = jnp.sum(weights)
    metrics = {**metrics, "expert_counts": out.expert_counts}
    if load_balance:  # the auxiliary loss and its metric only when it is trained
      lb = losses.load_balance(out.router_logits, out.expert_counts, k)
      total = total + load_balance * lb * n
      metrics["load_balance_sum"] = lb * n
    return total, (n, metrics)
  return loss_fn


class Stage:
  """`base.Stage` for language-model training."""

  def __init__(self, cfg):
    self.cfg = cfg

  def loss(self, model_cfg: l4.Config, hooks: l4.Hooks):
    c = self.cfg
    return make_loss(model_cfg, jnp.dtype(c.model.compute_dtype), c.model.remat, c.optim.z_loss,
                     c.optim.load_balance, hooks, c.optim.loss_chunk, c.model.frozen())

  def batch_spec(self, model_cfg: l4.Config) -> dict:
    shape = (self.cfg.data.batch_size, self.cfg.data.seq_len)
    spec = {k: (shape, jnp.int32) for k in ("tokens", "segment_ids", "positions")}
    if self.cfg.data.chat or model_cfg.vision is not None:
      spec["loss_mask"] = (shape, jnp.int32)
    if model_cfg.vision is not None:  # mmdata's rows: each row's padded tiles
      s = model_cfg.vision.image_size
      spec["pixel_values"] = ((shape[0], self.cfg.data.row_tiles, 3, s, s), jnp.bfloat16)
    return spec

  def data(self, trainer, workdir: Path, tok):
    it = iter(_dataset(self.cfg.data, trainer.model_cfg, tok, str(workdir), host()))
    return HostBatches(it, trainer.batch_sharding), None

  def measure(self, params, examples: int = 128, start=None) -> dict:
    """Next-token loss (SFT: on the assistant's tokens) on held-out rows of the stage's length."""
    model_cfg, batch = self.cfg.model.build(), self.cfg.data.batch_size
    tok = tokenizer_lib.for_model(self.cfg.data, model_cfg)
    it = iter(_dataset(held_out(self.cfg.data), model_cfg, tok, self.cfg.workdir))
    loss_fn = jax.jit(make_loss(model_cfg, jnp.float32, False, 0.0, 0.0))
    total = count = 0.0
    for _ in range(max(1, examples // batch)):
      s, (n, _) = loss_fn(params, {k: jnp.asarray(v) for k, v in next(it).items()})
      total, count = total + float(s), count + float(n)
    name = "assistant_token_loss" if self.cfg.data.chat else f"loss_at_seq_len_{self.cfg.data.seq_len}"
    return {name: total / count}


def _dataset(data_cfg, model_cfg: l4.Config, tok, workdir: str, where=(0, 1)):
  """The grain dataset of the stage's rows for this host: image-text, chat or text."""
  if model_cfg.vision is not None:
    paths = mmdata.resolve_paths(data_cfg, workdir)
    return mmdata.make_dataset(data_cfg, paths, tok, model_cfg.vision, *where)
  if data_cfg.chat:
    return chat.make_dataset(data_cfg, chat.resolve_paths(data_cfg, workdir), tok, *where)
  return data.make_dataset(data_cfg, data.resolve_paths(data_cfg, workdir), tok, *where)
