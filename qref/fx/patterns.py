"""What a BackendConfig says about weighted modules, read through its public attributes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.ao.quantization.backend_config.utils  # noqa: F401  (get_native_backend_config needs it loaded)
from torch.ao.quantization.backend_config import BackendConfig, get_native_backend_config


@dataclass
class Patterns:
    reference_of: dict  # float root module class -> reference quantized module class
    float_to_qat: dict  # float (or fused) module class -> its QAT class
    qat_classes: tuple
    fused_classes: tuple
    dtype_configs: dict  # pattern (a class or function) -> [DTypeConfig]

    def is_weighted(self, module) -> bool:
        cls = type(module)
        if cls in self.fused_classes:
            return type(module[0]) in self.reference_of
        return cls in self.reference_of or cls in self.qat_classes


def backend_patterns(backend_config: BackendConfig | dict | None) -> Patterns:
    if backend_config is None:
        backend_config = get_native_backend_config()
    elif isinstance(backend_config, dict):
        backend_config = BackendConfig.from_dict(backend_config)
    elif not isinstance(backend_config, BackendConfig):
        raise TypeError(
            f"backend_config must be a torch.ao.quantization.backend_config.BackendConfig, "
            f"got {type(backend_config).__name__}; e.g. get_native_backend_config()"
        )
    reference_of, float_to_qat, dtype_configs = {}, {}, {}
    qat, fused = set(), set()
    for config in backend_config.configs:
        if config.root_module is not None and config.reference_quantized_module is not None:
            reference_of[config.root_module] = config.reference_quantized_module
        if config.qat_module is not None:
            qat.add(config.qat_module)
            if isinstance(config.pattern, type):
                float_to_qat[config.pattern] = config.qat_module
        if config.fused_module is not None:
            fused.add(config.fused_module)
        pattern = config.pattern if config.pattern is not None else config._pattern_complex_format
        dtype_configs[pattern] = config.dtype_configs
    return Patterns(reference_of, float_to_qat, tuple(qat), tuple(fused), dtype_configs)


def supports(qconfig, dtype_configs) -> bool:
    """Whether one of the backend's dtype configs accepts ``qconfig``'s dtypes."""
    act, weight = qconfig.activation(), qconfig.weight()
    act_dtype, weight_dtype = act.dtype, weight.dtype
    act_dynamic = bool(getattr(act, "is_dynamic", False))
    for dc in dtype_configs:
        dynamic = bool(dc.is_dynamic)
        input_dtype = dc.input_dtype or torch.float
        output_dtype = dc.output_dtype or torch.float
        dc_weight = dc.weight_dtype or torch.float
        if dynamic:
            if act_dynamic and input_dtype == act_dtype and output_dtype == torch.float \
                    and dc_weight == weight_dtype:  # fmt: skip
                return True
            continue
        fp16 = act_dtype == weight_dtype == torch.float16
        bias_dtype = torch.float16 if fp16 else torch.float
        if (input_dtype == act_dtype == output_dtype and dc_weight == weight_dtype
                and (dc.bias_dtype or torch.float) == bias_dtype):  # fmt: skip
            return True
    return False
