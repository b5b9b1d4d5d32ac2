"""Tiny seeded `transformers` Llama 4 models, the numerical reference for the parity tests.

Weights are re-drawn after construction so activations are O(1) and nothing hides in HF's 0.02
init: norm weights 1 + 0.1 N, matrices N(0, 1/fan_in), embeddings N(0, 1).
"""
import dataclasses
import json

import torch
import transformers

import llama4_jax as l4
from llama4_jax import config as config_lib

_BASE = l4.presets.tiny().text

# Three text variants the parity tests cover (see llama4_hf_spec.md §5.2 for the idea).
VARIANTS = {
    # all-MoE, QK norm, llama3 16/1/1 scaling (Scout's empty smoothing band); 8 layers = 2 scan groups
    "scout": dataclasses.replace(
        _BASE, num_hidden_layers=8, interleave_moe_layer_step=1, rope_theta=500000.0,
        rope_scaling=l4.Llama3Scaling(16.0, 1.0, 1.0, 64)),
    # MoE/dense interleave without QK norm or scaling (Maverick)
    "maverick": dataclasses.replace(_BASE, use_qk_norm=False, rope_scaling=None,
                                    rope_theta=500000.0),
    # explicit no_rope_layers / moe_layers, top-2 routing, llama3 8/1/4 (all three bands)
    "mixed": dataclasses.replace(_BASE, rope_layers=(True, False, True, True), moe_layers=(1, 2),
                                 num_experts_per_tok=2),
}


def redraw_(model: torch.nn.Module, seed: int) -> None:
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
      elif "embed_tokens" in name:
        p.copy_(torch.randn(p.shape, generator=g))
      else:
        # nn.Linear [out, in]: fan-in last; fused experts [E, in, out]: fan-in in the middle.
        fan_in = p.shape[1] if name.endswith(("gate_up_proj", "down_proj")) and p.ndim == 3 else p.shape[-1]
        p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def causal_lm(text: l4.TextConfig, seed: int = 0) -> transformers.Llama4ForCausalLM:
  """A fp32 `Llama4ForCausalLM` built from our config through `to_hf` (eager attention)."""
  d = config_lib.text_to_hf(text)
  hf_cfg = transformers.Llama4TextConfig(**d)
  hf_cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.Llama4ForCausalLM(hf_cfg).eval()
  redraw_(model, seed)
  return model


# Two vision towers for the parity tests: 4x4 patches per 56 px tile (4 tokens per tile), and 2x2
# patches per 28 px tile (1 token) with head size 12, 3 layers and another RoPE theta.
VISION_VARIANTS = {
    "v56": l4.presets.tiny_vision(),
    "v28": l4.VisionConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                           intermediate_size=192, vision_output_dim=40, image_size=28,
                           patch_size=14, projector_input_dim=40, projector_output_dim=40,
                           rope_theta=5000.0),
}


def multimodal(text: l4.TextConfig, seed: int = 0,
               vision: l4.VisionConfig = l4.presets.tiny_vision()
               ) -> transformers.Llama4ForConditionalGeneration:
  """A fp32 `Llama4ForConditionalGeneration`: a tiny vision tower around the text model; image
  tokens are ids 248 (start), 249 (end), 250 (patch: image_token_index)."""
  hf_cfg = transformers.Llama4Config(text_config=config_lib.text_to_hf(text),
                                     vision_config=config_lib.vision_to_hf(vision),
                                     image_token_index=250, boi_token_index=248,
                                     eoi_token_index=249)
  hf_cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.Llama4ForConditionalGeneration(hf_cfg).eval()
  redraw_(model, seed)
  return model


def run(model, input_ids, attention_mask=None) -> tuple:
  """(logits, hidden_states tuple) as numpy, fp32."""
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(input_ids), output_hidden_states=True,
                attention_mask=None if attention_mask is None else torch.as_tensor(attention_mask))
  return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


def config_json(path) -> dict:
  return json.loads((path / "config.json").read_text())
