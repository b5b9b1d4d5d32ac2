"""Pretraining stage: next-token cross-entropy (+ optional z-loss and MoE load balance) on packed
rows. The same loss serves mid-training; later stages bring their own."""
import jax
import jax.numpy as jnp

import llama4_jax as l4
from train import losses


def forward(model_cfg: l4.Config, params, batch: dict, remat: bool, hooks: l4.Hooks) -> l4.Output:
  """The model on a packed batch, without the LM head. A multimodal batch carries pixel_values
  [B, tiles, C, S, S]: row b's image-token positions take its own tiles' features in order (zero
  tiles may pad rows to one tile count)."""
  t = model_cfg.text
  tokens = batch["tokens"]
  ctx = l4.model.token_context(t, *tokens.shape, positions=batch["positions"],
                               segment_ids=batch["segment_ids"])
  x = l4.model.embed_tokens(t, params, tokens)
  if "pixel_values" in batch:
    b, n = batch["pixel_values"].shape[:2]
    tiles = batch["pixel_values"].reshape(b * n, *batch["pixel_values"].shape[2:])
    _, rows = l4.vision.image_features(model_cfg, params, tiles, remat=remat,
                                       constrain=hooks.constrain)
    x = l4.vision.merge_rows(x, tokens, rows.reshape(b, -1, rows.shape[-1]),
                             model_cfg.image_token_index)
  return l4.model.run(t, params, x, ctx, remat=remat, hooks=hooks, with_head=False)


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
    lb = losses.load_balance(out.router_logits, out.expert_counts, k)
    total = total + load_balance * lb * n
    return total, (n, {**metrics, "load_balance_sum": lb * n,
                       "expert_counts": out.expert_counts})
  return loss_fn
