"""llama4_jax: Meta's Llama 4 (Scout, Maverick) as pure JAX functions of a params pytree.

    import llama4_jax as l4
    cfg, params = l4.load_hf(path)                     # HF dir -> Config + params
    logits = l4.forward(cfg, params, input_ids, attention_mask=None, pixel_values=None)
    tiles, aspect = l4.processor.preprocess(image)      # PIL/NumPy image -> [N, 3, 336, 336]
    l4.save_hf(out, cfg, params)                       # loadable by transformers
    l4.param_count(l4.presets.scout())

Dimension key used in names (x_BTD, w_EDF, ...): B batch, T query sequence, S key sequence,
D model width, F MLP width, N query heads, K KV heads, H head dim, V vocab, E experts,
L layers, G layer groups (scan length), N/A tokens/assignments in the MoE, J RoPE frequencies.
"""
from llama4_jax import presets, processor, vision
from llama4_jax.config import Config, Llama3Scaling, TextConfig, VisionConfig
from llama4_jax.decode import extend, init_cache
from llama4_jax.hf_io import CheckpointError, load_hf, save_hf
from llama4_jax.model import Hooks, Output, apply, forward
from llama4_jax.params import (BLOCK_MATMULS, ParamSpec, init_params, is_spec, param_axes,
                               param_count, param_specs)

__all__ = [
    "BLOCK_MATMULS", "CheckpointError", "Config", "Hooks", "Llama3Scaling", "Output", "ParamSpec", "TextConfig", "VisionConfig",
    "apply", "is_spec",
    "extend", "forward", "init_cache", "init_params", "load_hf", "param_axes", "param_count",
    "param_specs", "presets", "processor", "save_hf", "vision",
]
