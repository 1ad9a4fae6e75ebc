"""LoRA adapters on the frozen LLM (peft), and merging them back for export.

Reference: LoRA (Hu et al. 2021), adapting the attention query and value projections. Which
modules those are is read from the LLM's own layer names, never from the checkpoint's name:
LLaMA / Vicuna / OPT call them `q_proj` / `v_proj`, T5 `q` / `v`. 8-bit and 4-bit linear
layers of bitsandbytes are nn.Linear subclasses, so they are found (and adapted) the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# (query, value) projection names by LLM family, tried in this order.
QUERY_VALUE_NAMES = (("q_proj", "v_proj"), ("q", "v"), ("query", "value"))


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None  # None: the query/value projections found in the LLM


def linear_layer_names(module: nn.Module) -> set[str]:
    """Last name component of every linear layer under `module` (e.g. {"q_proj", "fc1", ...})."""
    return {name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def default_target_modules(llm: nn.Module) -> list[str]:
    present = linear_layer_names(llm)
    for pair in QUERY_VALUE_NAMES:
        if set(pair) <= present:
            return list(pair)
    raise ValueError(
        f"found no attention query/value projections among the LLM's linear layers {sorted(present)}; "
        "name the layers to adapt with lora_target_modules"
    )


def add_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Wrap `model.language_model` with LoRA adapters (trainable); returns the adapted layer names."""
    from peft import LoraConfig, get_peft_model

    llm = model.language_model
    targets = list(settings.target_modules) if settings.target_modules else default_target_modules(llm)
    unknown = sorted(set(targets) - linear_layer_names(llm))
    if unknown:
        raise ValueError(f"lora_target_modules {unknown} are not linear layers of the LLM; it has {sorted(linear_layer_names(llm))}")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets, bias="none")
    model.language_model = get_peft_model(llm, config)
    return targets


def has_lora(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model.language_model, PeftModel)


def merge_lora(model: nn.Module) -> None:
    """Fold the adapters into the LLM's weights and drop the peft wrapper (plain transformers LLM again)."""
    if has_lora(model):
        model.language_model = model.language_model.merge_and_unload()
