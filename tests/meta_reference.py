"""Meta's reference code for Llama 4 (the `llama-models` package): tokenizer, chat format and the
PyTorch Transformer, imported for the tests.

Meta's Transformer is built from fairscale's model-parallel layers; here they run with a model
parallel world of 1 over a one-process gloo group. Its attention allocates KV caches with
`.cuda()`; on this CPU-only machine that call is made a no-op while the model is built.

`llama_models.llama4.chat_format` imports torchvision at module level for its image transforms,
and no torchvision build works beside the pinned torch 2.13.0 CPU wheel. The tests never call
those transforms (our image preprocessing is checked against HF's processor), so empty
`torchvision` modules stand in for it while it is imported; calling one of Meta's transforms would fail loudly.
"""
import sys
import types

_STAND_IN = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
for _name in _STAND_IN:
  sys.modules.setdefault(_name, types.ModuleType(_name))
sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]

from llama_models.datatypes import RawMessage, StopReason  # noqa: E402
from llama_models.llama4 import chat_format  # noqa: E402
from llama_models.llama4.args import Size, VisionArgs  # noqa: E402
from llama_models.llama4.tokenizer import Tokenizer  # noqa: E402

for _name in _STAND_IN:  # gone again, so transformers does not take torchvision for installed
  del sys.modules[_name]

import fairscale.nn.model_parallel.initialize as fs_init  # noqa: E402
import torch  # noqa: E402
from llama_models.llama4 import model as meta_model  # noqa: E402
from llama_models.llama4.args import ModelArgs, MoEArgs  # noqa: E402
from llama_models.llama4.datatypes import TransformerInput  # noqa: E402

__all__ = ["RawMessage", "StopReason", "chat_format", "Size", "VisionArgs", "Tokenizer",
           "transformer", "logits"]


def _model_parallel_world_of_one() -> None:
  if not torch.distributed.is_initialized():
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0,
                                         world_size=1)
  if not fs_init.model_parallel_is_initialized():
    fs_init.initialize_model_parallel(1)


def model_args(text, max_seq_len: int) -> ModelArgs:
  """Meta's ModelArgs for our TextConfig. Meta derives sizes its own way: head_dim = dim / heads,
  dense and expert hidden sizes from dim, ffn_exp, ffn_dim_multiplier and multiple_of; llama3
  scaling with low-frequency factor 1 and original length 8192; NoPE every n-th layer."""
  assert text.head_dim * text.num_attention_heads == text.hidden_size
  assert text.intermediate_size == text.intermediate_size_mlp
  dense = int(2 * 4 * text.hidden_size / 3)
  scaling = text.rope_scaling
  assert scaling is None or (scaling.low_freq_factor, scaling.original_max_position_embeddings) == (1.0, 8192)
  return ModelArgs(
      dim=text.hidden_size, n_layers=text.num_hidden_layers, n_heads=text.num_attention_heads,
      n_kv_heads=text.num_key_value_heads, vocab_size=text.vocab_size, multiple_of=1,
      ffn_dim_multiplier=(text.intermediate_size + 0.5) / dense, ffn_exp=4.0, norm_eps=text.rms_norm_eps,
      attention_chunk_size=text.attention_chunk_size, rope_theta=text.rope_theta,
      use_scaled_rope=scaling is not None,
      rope_scaling_factor=scaling and scaling.factor,
      rope_high_freq_factor=scaling and scaling.high_freq_factor,
      nope_layer_interval=text.no_rope_layer_interval, use_qk_norm=text.use_qk_norm,
      attn_temperature_tuning=True, floor_scale=text.floor_scale, attn_scale=text.attn_scale,
      moe_args=MoEArgs(num_experts=text.num_local_experts, top_k=text.num_experts_per_tok,
                       interleave_moe_layer_step=text.interleave_moe_layer_step,
                       auto_scale_F=False),
      max_batch_size=2, max_seq_len=max_seq_len)


def meta_state_dict(hf: dict) -> dict:
  """HF Llama4ForCausalLM tensors under Meta's names and layouts."""
  out = {}
  for name, w in hf.items():
    name = name.removeprefix("model.").replace("experts.gate_up_proj", "experts.gate_up")
    for a, b in (("embed_tokens", "tok_embeddings"), ("lm_head", "output"),
                 ("input_layernorm", "attention_norm"), ("post_attention_layernorm", "ffn_norm"),
                 ("self_attn.", "attention."), ("q_proj", "wq"), ("k_proj", "wk"),
                 ("v_proj", "wv"), ("o_proj", "wo"), ("gate_proj", "w1"), ("up_proj", "w3"),
                 ("down_proj", "w2"), ("router.weight", "router_DE")):
      name = name.replace(a, b)
    if name.endswith("router_DE"):  # HF [E, D] (nn.Linear) -> Meta [D, E]
      w = w.T
    if name.endswith("experts.gate_up"):  # HF [E, D, 2F], gate first -> Meta w1, w3 [E, D, F]
      out[name[:-7] + "w1"], out[name[:-7] + "w3"] = w.chunk(2, -1)
    else:
      out[name] = w
  return out


def transformer(text, hf_model, max_seq_len: int = 64) -> torch.nn.Module:
  """Meta's `llama_models.llama4.model.Transformer` (fp32) with the weights of `hf_model`."""
  _model_parallel_world_of_one()
  cuda, torch.Tensor.cuda = torch.Tensor.cuda, lambda self, *a, **k: self
  try:
    model = meta_model.Transformer(model_args(text, max_seq_len))
  finally:
    torch.Tensor.cuda = cuda
  model.load_state_dict(meta_state_dict(hf_model.state_dict()), strict=True)
  return model.eval()


def logits(model, ids, start: int = 0):
  return model(TransformerInput(tokens=torch.as_tensor(ids), tokens_position=start)).logits.numpy()
