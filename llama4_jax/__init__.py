"""llama4_jax: Meta's Llama 4 (Scout, Maverick) as pure JAX functions of a params pytree.

    import llama4_jax as l4
    cfg, params = l4.load_hf(path)                     # HF dir -> Config + params
    logits = l4.forward(cfg, params, input_ids, attention_mask=None, pixel_values=None)
    tiles, aspect = l4.processor.preprocess(image)      # PIL/NumPy image -> [N, 3, 336, 336]
    l4.save_hf(out, cfg, params)                       # loadable by transformers
    l4.param_count(l4.presets.scout())

Dimension key, one meaning per letter, for array-name suffixes (x_BTD, gate_EDF) and einsum
subscripts across llama4_jax/, sharding/ and train/:
  B batch            T query positions     S key positions      D model width    F FFN width
  V vocabulary       L layers              J RoPE frequencies   H head dim
  N query heads      K KV heads            G query heads per KV head (N = K G)   Q G T rows
  E experts          R token rows entering the MoE (B T)        X routing choices per row
  A (row, choice) assignments, sorted by expert                 Z devices on the expert axis
  U blocks of the blocked grouped matmul (b rows each; lower case is a size inside a block)
  I image tiles      P patches per tile    M image feature rows (placeholders to fill)
  1 a broadcast axis. A name without a suffix has its shape in its docstring.
"""
from llama4_jax import decode, presets, processor, quant, vision
from llama4_jax.config import Config, Llama3Scaling, TextConfig, VisionConfig
from llama4_jax.decode import extend, generate, init_cache
from llama4_jax.quant import quantize
from llama4_jax.hf_io import CheckpointError, load_hf, save_hf
from llama4_jax.model import Hooks, Output, apply, forward
from llama4_jax.params import (BLOCK_MATMULS, ParamSpec, init_params, is_spec, param_axes,
                               param_count, param_specs)

__all__ = [
    "BLOCK_MATMULS", "CheckpointError", "Config", "Hooks", "Llama3Scaling", "Output", "ParamSpec", "TextConfig", "VisionConfig",
    "apply", "decode", "generate", "is_spec",
    "extend", "forward", "init_cache", "init_params", "load_hf", "param_axes", "param_count",
    "param_specs", "presets", "processor", "quant", "quantize", "save_hf", "vision",
]
