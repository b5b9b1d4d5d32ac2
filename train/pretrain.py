"""Pretraining stage: next-token cross-entropy (+ optional z-loss and MoE load balance) on packed
rows. The same loss serves mid-training; later stages bring their own."""
import jax
import jax.numpy as jnp

import llama4_jax as l4
from train import losses


def make_loss(model_cfg: l4.Config, compute_dtype, remat: bool, z_loss: float,
              load_balance: float, hooks: l4.Hooks = l4.Hooks(), loss_chunk: int = 0):
  """loss_fn(params, batch) -> (summed loss, (target count, metrics)). loss_chunk > 0 computes the
  LM head and cross-entropy that many positions at a time (no [B, T, V] logits held)."""
  k = model_cfg.text.num_experts_per_tok

  def loss_fn(params, batch):
    # params are the optimizer's copy (fp32 or bf16); the forward runs in compute_dtype
    p = jax.tree.map(lambda a: a.astype(compute_dtype), params)
    out = l4.apply(model_cfg, p, batch["tokens"], positions=batch["positions"],
                   segment_ids=batch["segment_ids"], remat=remat, hooks=hooks, with_head=False)
    targets, weights = losses.next_token_targets(batch)
    total, metrics = losses.chunked_cross_entropy(lambda x: l4.model.head(model_cfg.text, p, x),
                                                  out.final, targets, weights, z_loss, loss_chunk)
    n = jnp.sum(weights)
    lb = losses.load_balance(out.router_logits, out.expert_counts, k)
    total = total + load_balance * lb * n
    return total, (n, {**metrics, "load_balance_sum": lb * n,
                       "expert_counts": out.expert_counts})
  return loss_fn
