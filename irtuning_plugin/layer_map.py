"""Which parameters belong to which decoder layer.

The decoder stack is found generically (the largest ``nn.ModuleList`` of identical blocks), also
through PEFT wrappers, or named explicitly with a dotted path (which may also point at an
``nn.Sequential`` of blocks). Only parameters inside the blocks are ever toggled; trainable parameters
outside them (embeddings, final norm, head, modules_to_save) are reported and left as they are.

A layer with nothing selectable (no trainable adapter tensor: LoRA not applied there, or frozen before
training) keeps its index, is named in :meth:`LayerMap.describe`, and is refused at train start by the
engine for every strategy but ``all``: left in, it would count as a trained layer that trains nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

LOG = logging.getLogger(__name__)

SCOPES = ("adapter", "full")

# Parameter-name fragments of adapter tensors (PEFT LoRA, DoRA magnitude, LoRA on embeddings).
ADAPTER_MARKERS = ("lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")


class LayerMapError(ValueError):
    """The decoder layers or their parameters could not be identified."""


@dataclass
class LayerMap:
    """Decoder blocks and the selectable parameters of each."""

    layers_path: str
    layers: nn.ModuleList | nn.Sequential
    scope: str
    params: list[list[nn.Parameter]]
    names: list[list[str]]
    outside_trainable: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def flat(self) -> tuple[list[nn.Parameter], list[int]]:
        """All selectable parameters and the layer index of each, in layer order."""
        out, ids = [], []
        for i, ps in enumerate(self.params):
            out.extend(ps)
            ids.extend([i] * len(ps))
        return out, ids

    @property
    def empty_layers(self) -> list[int]:
        """Layers without any selectable tensor (refused at train start except by strategy ``all``)."""
        return [i for i, ps in enumerate(self.params) if not ps]

    def describe(self) -> str:
        n = sum(p.numel() for ps in self.params for p in ps)
        empty = self.empty_layers
        return (
            f"{self.num_layers} layers at '{self.layers_path}', scope={self.scope}, "
            f"{sum(len(p) for p in self.params)} selectable tensors ({n:,} parameters); "
            f"{len(self.outside_trainable)} trainable tensors outside the layers are never toggled"
            + (f"; layers {empty} hold nothing selectable (refused at train start unless irtuning_strategy: all)"
               if empty else "")
        )


def _resolve(root: nn.Module, path: str) -> nn.Module | None:
    obj = root
    for part in path.split("."):
        if part == "":
            return None
        if isinstance(obj, (nn.ModuleList, nn.Sequential)) and part.isdigit():
            idx = int(part)
            if idx >= len(obj):
                return None
            obj = obj[idx]
            continue
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def _candidate_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            kinds = {type(m) for m in mod}
            if len(kinds) == 1:
                found.append((name, mod))
    return found


def find_decoder_layers(model: nn.Module, layers_path: str | None = None) -> tuple[str, nn.ModuleList | nn.Sequential]:
    """Return ``(path, module_list)`` of the decoder blocks of ``model``.

    ``layers_path`` is a dotted path from ``model`` (e.g. ``model.layers``) to an ``nn.ModuleList`` or an
    ``nn.Sequential`` of blocks; for a PEFT-wrapped model it may also be given relative to the base model,
    as in an unwrapped recipe. Found automatically, only an ``nn.ModuleList`` qualifies (a Sequential is
    as often an MLP as a block stack).
    """
    if layers_path:
        roots = [("", model)]
        get_base = getattr(model, "get_base_model", None)
        if callable(get_base):
            base = get_base()
            prefix = next((n for n, m in model.named_modules() if m is base), "")
            roots.append((prefix, base))
        for prefix, root in roots:
            mod = _resolve(root, layers_path)
            if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) > 0:
                full = f"{prefix}.{layers_path}" if prefix else layers_path
                return full, mod
        cands = ", ".join(n for n, _ in _candidate_lists(model)[:5]) or "none"
        raise LayerMapError(
            f"irtuning_layers_path={layers_path!r} does not resolve to a non-empty nn.ModuleList or "
            f"nn.Sequential of this model (candidates found: {cands})"
        )
    cands = _candidate_lists(model)
    if not cands:
        raise LayerMapError(
            "no decoder layer list found in the model; set irtuning_layers_path to the dotted path of its "
            "nn.ModuleList of decoder blocks (e.g. model.layers)"
        )

    def weight(item):
        _, mod = item
        return sum(p.numel() for p in mod.parameters())

    name, mod = max(cands, key=weight)
    return name, mod


def is_adapter_param(name: str) -> bool:
    """The parameter name is that of an adapter tensor (LoRA A/B, DoRA magnitude, LoRA on embeddings)."""
    return any(marker in name for marker in ADAPTER_MARKERS)


def build_layer_map(model: nn.Module, scope: str = "adapter", layers_path: str | None = None) -> LayerMap:
    """Map each selectable parameter to its decoder layer.

    ``scope='adapter'``: the adapter tensors (LoRA A/B, DoRA magnitude) that are trainable now.
    ``scope='full'``: every parameter of each block (full fine-tuning).
    """
    if scope not in SCOPES:
        raise LayerMapError(f"irtuning_scope={scope!r}; allowed: {', '.join(SCOPES)}")
    path, layers = find_decoder_layers(model, layers_path)
    params: list[list[nn.Parameter]] = []
    names: list[list[str]] = []
    seen: set[int] = set()
    for block in layers:
        ps, ns = [], []
        for name, p in block.named_parameters():
            if id(p) in seen:
                continue
            if scope == "adapter" and not (is_adapter_param(name) and p.requires_grad):
                continue
            seen.add(id(p))
            ps.append(p)
            ns.append(name)
        params.append(ps)
        names.append(ns)
    if scope == "adapter" and not any(params):
        raise LayerMapError(
            "irtuning_scope='adapter' but the decoder layers hold no trainable adapter (LoRA) tensors: "
            "use an adapter (e.g. `adapter: lora`) or set irtuning_scope: full"
        )
    outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    lm = LayerMap(path, layers, scope, params, names, outside)
    LOG.info("irtuning layer map: %s", lm.describe())
    return lm


def set_layers_trainable(layer_map: LayerMap, active: set[int] | list[int]) -> None:
    """requires_grad on for the parameters of ``active`` layers, off (and grad dropped) for the rest."""
    active = set(active)
    with torch.no_grad():
        for i, ps in enumerate(layer_map.params):
            on = i in active
            for p in ps:
                p.requires_grad_(on)
                if not on:
                    p.grad = None
