"""Weight quantization applied from outside the model: swap the decoder's nn.Linear modules for bitsandbytes
4-bit (NF4) or 8-bit (LLM.int8) ones while the checkpoint streams in.

Each linear's full-precision weight is staged alone (one module at a time, at most a few while split q/k/v
rows arrive), quantized as soon as it is complete, and dropped: the full-precision model never exists.
The embedding and lm_head stay in the model dtype (standard practice: they are gathers / the logits path).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

QUANT_METHODS = ("nf4", "int8")

# Linear modules inside each decoder layer that are quantized.
_QUANTIZED_SUFFIXES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def _drop_int8_cast_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _bnb():
    try:
        import bitsandbytes as bnb  # noqa: PLC0415 (optional dependency)
    except ImportError:
        raise ValueError("quantization needs bitsandbytes: pip install 'glm-serve[quant]'") from None
    return bnb


class QuantizedLoader:
    def __init__(self, model: nn.Module, method: str, device: torch.device, dtype: torch.dtype):
        self.bnb = _bnb()
        if method == "int8" and dtype != torch.float16:
            # LLM.int8 multiplies in float16 whatever the model dtype; bitsandbytes logs a warning saying so on
            # every linear call, which floods the log of a float32 (CPU) or bf16 server: say it once here.
            logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_int8_cast_warning)
            log.info("int8: the quantized linears compute in float16 (inputs cast from %s)", dtype)
        self.model, self.method, self.device, self.dtype = model, method, device, dtype
        self.linears: dict[str, nn.Linear] = {
            name: mod for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and name.endswith(_QUANTIZED_SUFFIXES)
        }
        self.module_names = set(self.linears)
        self._staged: dict[str, dict[str, torch.Tensor]] = {}  # module -> {"weight"/"bias": full tensor}
        self._rows: dict[str, int] = {}  # param name -> rows filled
        self._done: set[str] = set()

    def owns(self, param: str) -> bool:
        return param.rsplit(".", 1)[0] in self.linears

    def shape(self, param: str) -> tuple[int, ...]:
        mod, kind = param.rsplit(".", 1)
        return tuple(getattr(self.linears[mod], kind).shape)

    def expected_rows(self) -> dict[str, int]:
        out = {}
        for name, lin in self.linears.items():
            out[f"{name}.weight"] = lin.out_features
            if lin.bias is not None:
                out[f"{name}.bias"] = lin.out_features
        return out

    def fill(self, param: str, lo: int, hi: int, tensor: torch.Tensor) -> None:
        mod, kind = param.rsplit(".", 1)
        staged = self._staged.setdefault(mod, {})
        if kind not in staged:
            staged[kind] = torch.empty(self.shape(param), dtype=self.dtype, device="cpu")
        staged[kind][lo:hi].copy_(tensor)
        self._rows[param] = self._rows.get(param, 0) + (hi - lo)
        lin = self.linears[mod]
        complete = self._rows.get(f"{mod}.weight", 0) == lin.out_features and (
            lin.bias is None or self._rows.get(f"{mod}.bias", 0) == lin.out_features
        )
        if complete:
            self._swap(mod, self._staged.pop(mod))

    def _swap(self, name: str, staged: dict[str, torch.Tensor]) -> None:
        lin, bnb = self.linears[name], self.bnb
        has_bias = lin.bias is not None
        if self.method == "nf4":
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias, compute_dtype=self.dtype,
                                    quant_type="nf4", device="meta")
            new.weight = bnb.nn.Params4bit(staged["weight"], requires_grad=False, quant_type="nf4")
        else:
            new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False,
                                      device="meta")
            new.weight = bnb.nn.Int8Params(staged["weight"], requires_grad=False, has_fp16_weights=False)
        if has_bias:
            new.bias = nn.Parameter(staged["bias"], requires_grad=False)
        new = new.to(self.device)  # bitsandbytes quantizes on the move to the device
        parent_name, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent_name), child, new)
        self._done.add(name)

    def finish(self) -> None:
        left = sorted(self.module_names - self._done)
        if left:
            raise ValueError(f"quantization: weights never completed for {', '.join(left[:5])}")
