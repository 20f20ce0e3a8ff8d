"""FLoRA: Tucker adapters for N-D parameters (Linear, Conv1d/2d/3d, Embedding) with a
PEFT-style API.

dW = scale * G x_1 A_1 ... x_N A_N over every mode of the target's weight (a conv kernel
keeps its [out, in/groups, k...] structure instead of being flattened as LoRA does).

```python
from semisparse.flora import FLoRAConfig, get_flora_model, load_adapter
cfg = FLoRAConfig(ranks=(8, 8, 2, 2), scale=4.0, target_modules=["conv1", "conv2"])
model = get_flora_model(base, cfg)          # base frozen, adapter "default" trains
model.print_trainable_parameters()
model.save_pretrained("out/")               # adapter_config.json + adapter_model.safetensors
model = load_adapter(fresh_base, "out/")    # or FLoRAModel.from_pretrained(fresh_base, "out/")
plain = model.merge_and_unload()
```

See :mod:`semisparse.flora.layers` (formula, init, fused vs delta forward, merge) and
:mod:`semisparse.flora.model` (matching rules, modules_to_save, file format)."""

from .config import FLoRAConfig, resolve_ranks
from .layers import (
    SUPPORTED_TYPES,
    FLoRAConv,
    FLoRAEmbedding,
    FLoRALayer,
    FLoRALinear,
    ModulesToSaveWrapper,
    mode_product_chain,
    wrap_module,
)
from .model import (
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    FLoRAModel,
    get_flora_model,
    load_adapter,
)

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "SUPPORTED_TYPES",
    "WEIGHTS_NAME",
    "FLoRAConfig",
    "FLoRAConv",
    "FLoRAEmbedding",
    "FLoRALayer",
    "FLoRALinear",
    "FLoRAModel",
    "ModulesToSaveWrapper",
    "get_flora_model",
    "load_adapter",
    "mode_product_chain",
    "resolve_ranks",
    "wrap_module",
]
