"""Released Llama 4 configurations and a tiny one for tests and the CPU demo.

Values from the released HF `config.json` files (see docs/hf_reference.md §1):
Scout 17B-16E and Maverick 17B-128E share every dimension; they differ in experts, MoE interleave,
QK norm and RoPE scaling.
"""
import dataclasses

from llama4_jax.config import Config, Llama3Scaling, TextConfig, VisionConfig


def scout() -> Config:
  """Llama 4 Scout 17B-16E: 16 experts in every layer, QK norm, llama3 RoPE 16/1/1/8192; with the
  released vision tower (`Llama4ForConditionalGeneration`)."""
  return Config(text=TextConfig(), vision=VisionConfig())


def maverick() -> Config:
  """Llama 4 Maverick 17B-128E: 128 experts in odd layers, dense even layers, no QK norm, plain RoPE."""
  text = dataclasses.replace(TextConfig(), num_local_experts=128, interleave_moe_layer_step=2,
                             use_qk_norm=False, rope_scaling=None,
                             max_position_embeddings=1048576)
  return Config(text=text, vision=VisionConfig())


def tiny() -> Config:
  """A 4-layer model with every Llama 4 feature active at short sequence lengths, and the token
  ids of the training byte tokenizer (train/tokenizer.py): bytes, then begin 256, end 257, pad 258,
  image start 262, end 263 and patch 267 (269 tokens, vocabulary 272).

  L0 RoPE chunked dense, L1 RoPE chunked MoE, L2 RoPE chunked dense, L3 NoPE full MoE. Chunk 8 and
  floor_scale 4 make chunking and temperature tuning act within 20 tokens; head_dim 24 != 64/4 and
  llama3 scaling with original length 64 hits all three frequency bands.
  """
  text = TextConfig(
      vocab_size=272, hidden_size=64, intermediate_size=40, intermediate_size_mlp=96,
      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
      num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
      use_qk_norm=True, rope_theta=10000.0,
      rope_scaling=Llama3Scaling(8.0, 1.0, 4.0, 64), attention_chunk_size=8,
      floor_scale=4, attn_scale=0.1, max_position_embeddings=512,
      bos_token_id=256, eos_token_id=(257,), pad_token_id=258)
  return Config(text=text, boi_token_index=262, eoi_token_index=263, image_token_index=267)


def tiny_vision() -> VisionConfig:
  """2 layers, width 32, 56 px tiles of 4x4 patches: 4 `<|patch|>` tokens per tile."""
  return VisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, vision_output_dim=48, image_size=56, patch_size=14,
                      projector_input_dim=48, projector_output_dim=48)


def tiny_multimodal() -> Config:
  """`tiny()` with `tiny_vision()`."""
  return dataclasses.replace(tiny(), vision=tiny_vision())
