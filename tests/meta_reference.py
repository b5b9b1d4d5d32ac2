"""Meta's reference code for Llama 4 (the `llama-models` package): tokenizer, chat format and the
PyTorch Transformer, imported for the tests.

`llama_models.llama4.chat_format` imports torchvision at module level for its image transforms,
and no torchvision build works beside the pinned torch 2.13.0 CPU wheel. The tests never call
those transforms (our image preprocessing is checked against HF's processor), so empty
`torchvision` modules stand in for it; calling one of Meta's transforms would fail loudly.
"""
import sys
import types

for _name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
  sys.modules.setdefault(_name, types.ModuleType(_name))
sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]

from llama_models.datatypes import RawMessage, StopReason  # noqa: E402
from llama_models.llama4 import chat_format  # noqa: E402
from llama_models.llama4.args import Size, VisionArgs  # noqa: E402
from llama_models.llama4.tokenizer import Tokenizer  # noqa: E402

__all__ = ["RawMessage", "StopReason", "chat_format", "Size", "VisionArgs", "Tokenizer"]
