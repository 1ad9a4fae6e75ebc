"""8-bit (LLM.int8) and 4-bit (NF4) quantisation of the frozen LLM with bitsandbytes.

Only the LLM's linear layers are quantised: they hold almost all the weights. The vision
encoder, the Q-Former and the projection stay in the float dtype (they are small, and the
Q-Former is what users fine-tune). The output head (`lm_head`) stays in float too, as in
transformers, because quantising the logits layer costs accuracy for little memory.
"""

from __future__ import annotations

import re
import sys

import torch
from torch import nn

KEEP_IN_FLOAT = ("lm_head",)


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - bitsandbytes is in requirements.txt
        raise ImportError("8-bit / 4-bit loading needs bitsandbytes: pip install bitsandbytes") from e
    return bnb


def _quantized_linear(linear: nn.Linear, bits: int, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    bnb = _bnb()
    has_bias = linear.bias is not None
    weight = linear.weight.data.to("cpu", compute_dtype)  # bitsandbytes quantises on the move to `device`
    if bits == 8:
        new = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0, device="meta"
        )
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
            quant_type="nf4", device="meta",
        )
        new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if has_bias:
        new.bias = nn.Parameter(linear.bias.data.to("cpu", compute_dtype), requires_grad=False)
    return new.to(device)


def quantize_linear_layers(
    module: nn.Module, bits: int, compute_dtype: torch.dtype, device: torch.device | str,
    *, skip: re.Pattern | None = None, prefix: str = "",
) -> int:
    """Replace every nn.Linear under `module` in place, except KEEP_IN_FLOAT and those whose full
    name (`prefix` + name) `skip` matches (transformers' keep-in-fp32 list). Returns how many."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    device = torch.device(device)
    count = 0
    for name, child in list(module.named_modules()):
        for child_name, leaf in list(child.named_children()):
            full = f"{prefix}{name}.{child_name}" if name else f"{prefix}{child_name}"
            if type(leaf) is not nn.Linear or child_name in KEEP_IN_FLOAT or (skip is not None and skip.search(full)):
                continue
            setattr(child, child_name, _quantized_linear(leaf, bits, compute_dtype, device))
            count += 1
    return count


def weight_bytes(module: nn.Module) -> int:
    """Resident bytes of a module's weights, quantisation state (scales, absmax) included."""
    total = sum(t.numel() * t.element_size() for t in module.parameters())
    total += sum(b.numel() * b.element_size() for b in module.buffers())
    for m in module.modules():
        weight = getattr(m, "weight", None)
        scb = getattr(weight, "SCB", None)  # 8-bit per-row scales
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
        state = getattr(weight, "quant_state", None)  # 4-bit block absmax (+ nested stats)
        if state is not None:
            for t in (state.absmax, state.code, getattr(state.state2, "absmax", None) if state.nested else None):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


def is_quantized(module: nn.Module) -> bool:
    # Only `quantize_linear_layers` makes bitsandbytes layers, and it imports bitsandbytes first: a
    # process that never imported it holds no quantised module, and saving or generating with a
    # float model must not need the package (a GPU machine without it failed to save the recipe's
    # first checkpoint).
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return False
    return any(isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in module.modules())
