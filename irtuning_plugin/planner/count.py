"""Exact per-layer costs of one training step, counted on the meta device with the model's architecture.

A decoder layer costs the same wherever it sits, so one small model of the same architecture (the real
config with ``num_hidden_layers`` cut to 4) is counted once, with its layers in the four states a layer can
be in during a step, and the whole depth is put together from those (``tests/test_plan.py`` checks the sum
against a direct count of a deeper model):

* ``below``: under the lowest trained layer, with frozen embeddings: no tensor there requires grad, so it
  saves nothing and has no backward (the engine's backward cut);
* ``lowest``: the lowest trained layer when its input does not require grad;
* ``trained``: a trained layer whose input requires grad;
* ``frozen``: a frozen layer that backward passes through (above the lowest trained layer, or anywhere when
  the embeddings train).

Counted: FLOPs (``FlopCounterMode``, per module), bytes saved for backward (``saved_tensors_hooks``, booked to
the decoder layer that saved a storage first), parameter bytes per layer and outside the layers. The attention
kernel of ``sdpa``/``flash`` is a stand-in op that saves what flash-attention's backward reads (q, k, v, the
output and the fp32 log-sum-exp), with torch's sdpa FLOP formula: modelled, not a CUDA kernel's own count.
``eager`` runs transformers' eager attention, which keeps the seq x seq probabilities.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field

import torch
from torch.utils import flop_counter

from irtuning_plugin.planner.counters import SavedBytes, storage_key

STATES = ("below", "lowest", "trained", "frozen")
ATTENTION = ("eager", "sdpa", "flash")
COUNT_LAYERS = 4
_ATTN_NAME = "irtuning_plan_kernel"  # no "flash" in the name: transformers would look for a hub kernel


# ---- a stand-in flash-attention kernel (meta and CPU: shapes only) ---------------------------------------
@torch.library.custom_op("irtuning_plan::attn", mutates_args=())
def _attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@_attn.register_fake
def _attn_fake(q, k, v):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("irtuning_plan::attn_bwd", mutates_args=())
def _attn_bwd(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@_attn_bwd.register_fake
def _attn_bwd_fake(g, q, k, v, out, lse):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)  # what flash-attention 2's backward reads


def _backward(ctx, g_out, g_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return torch.ops.irtuning_plan.attn_bwd(g_out, q, k, v, out, lse)


_attn.register_autograd(_backward, setup_context=_setup)


def _as_heads(shape, heads):  # GQA: every query head attends, so count with the query's head count
    return (shape[0], heads, shape[2], shape[3])


@flop_counter.register_flop_formula(torch.ops.irtuning_plan.attn)
def _attn_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    h = q_shape[1]
    return flop_counter.sdpa_flop_count(q_shape, _as_heads(k_shape, h), _as_heads(v_shape, h))


@flop_counter.register_flop_formula(torch.ops.irtuning_plan.attn_bwd)
def _attn_bwd_flops(g_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    h = q_shape[1]
    return flop_counter.sdpa_backward_flop_count(g_shape, q_shape, _as_heads(k_shape, h), _as_heads(v_shape, h))


def _flash_like_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    out, _ = torch.ops.irtuning_plan.attn(query, key, value)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTN_NAME, _flash_like_attention)


# ---- the setup counted -------------------------------------------------------------------------------------
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class CountSetup:
    config_json: str  # the model's config.json (a JSON string: hashable)
    scope: str = "adapter"  # adapter | full
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    weight_dtype: str = "bf16"
    attention: str = "sdpa"
    train_outside: bool = False  # embeddings, final norm and head train (full fine-tuning, lisa)
    adapter_dtype: str = "fp32"  # fp32: PEFT's autocast_adapter_dtype (its default); weights: the base's dtype

    @property
    def config_dict(self) -> dict:
        return json.loads(self.config_json)


@dataclass
class LayerCosts:
    """Counted costs at one micro-batch x sequence length."""

    num_layers: int
    batch: int
    seq: int
    saved: dict[str, int]  # per state, bytes saved for backward by one layer
    fwd_flops: dict[str, int]
    bwd_flops: dict[str, int]
    layer_input_bytes: int  # the hidden states entering a layer (what checkpointing keeps per layer)
    outside_saved: int  # embeddings, final norm, head and loss
    outside_fwd_flops: int
    outside_bwd_flops: int
    layer_param_bytes: int  # all parameters of one layer (frozen base + adapter)
    layer_trainable_bytes: int  # what a trained layer trains (its adapter tensors, or all of it)
    layer_trainable_tensors: int
    layer_trainable_numel: int
    outside_param_bytes: int
    outside_trainable_bytes: int
    outside_trainable_tensors: int
    outside_trainable_numel: int
    vocab: int
    hidden: int
    notes: list[str] = field(default_factory=list)

    @property
    def total_param_bytes(self) -> int:
        return self.outside_param_bytes + self.num_layers * self.layer_param_bytes


def build_meta_model(setup: CountSetup, num_layers: int, device: str = "meta"):
    """The architecture of ``setup`` with ``num_layers`` decoder layers (random init when not on meta)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in setup.config_dict.items() if not k.startswith("_")}
    model_type = cfg.pop("model_type")
    cfg["num_hidden_layers"] = num_layers
    if "layer_types" in cfg:
        cfg["layer_types"] = [cfg["layer_types"][0]] * num_layers
    cfg.pop("architectures", None)
    cfg.pop("torch_dtype", None)
    cfg.pop("dtype", None)
    config = AutoConfig.for_model(model_type, **cfg)
    if setup.attention == "eager":
        attn = "eager"
    elif device == "meta":
        _register_attention()
        attn = _ATTN_NAME
    else:
        attn = "sdpa"
    config._attn_implementation = attn
    ctx = torch.device("meta") if device == "meta" else contextlib.nullcontext()
    with ctx:
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[setup.weight_dtype], attn_implementation=attn)
    if setup.scope == "adapter":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=setup.lora_r, lora_alpha=setup.lora_alpha,
                                                 lora_dropout=setup.lora_dropout,
                                                 target_modules=list(setup.lora_targets), task_type="CAUSAL_LM"),
                               autocast_adapter_dtype=setup.adapter_dtype == "fp32")
    model.train()
    return model


def apply_states(model, setup: CountSetup, trained: list[int]) -> None:
    """Trainable flags of a step that trains layers ``trained`` (the engine's, outside the layers as the
    setup says)."""
    from irtuning_plugin.layer_map import build_layer_map, set_layers_trainable

    lm = build_layer_map(model, setup.scope)
    set_layers_trainable(lm, trained)
    layer_params = {id(p) for ps in lm.params for p in ps}
    in_layers = {id(p) for layer in lm.layers for p in layer.parameters()}
    for p in model.parameters():
        if id(p) in in_layers:
            if id(p) not in layer_params:
                p.requires_grad_(False)
        else:
            p.requires_grad_(setup.train_outside)
    return lm


def _pattern(setup: CountSetup) -> tuple[list[int], list[str]]:
    """The trained layers of the counted 4-layer model and the state each layer is then in."""
    if setup.train_outside:  # the embeddings train: backward reaches every layer
        return [1, 2], ["frozen", "trained", "trained", "frozen"]
    return [1, 2], ["below", "lowest", "trained", "frozen"]


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


def _module_flops(counter: flop_counter.FlopCounterMode, names: list[str]) -> dict[str, int]:
    counts = counter.get_flop_counts()
    out = {}
    for name in names:
        hits = [k for k in counts if k.endswith(name)]
        out[name] = int(sum(counts[hits[0]].values())) if hits else 0
    return out


def count_costs(setup: CountSetup, batch: int, seq: int, num_layers: int | None = None) -> LayerCosts:
    """Count one step of ``setup`` at ``batch x seq`` on the meta device; ``num_layers``: the real depth
    (default: the config's)."""
    cfg = setup.config_dict
    depth = int(num_layers or cfg["num_hidden_layers"])
    model = build_meta_model(setup, COUNT_LAYERS)
    trained, states = _pattern(setup)
    lm = apply_states(model, setup, trained)
    layer_names = [f"{lm.layers_path.split('base_model.model.')[-1]}.{i}" for i in range(COUNT_LAYERS)]
    current: list = [None]
    shared: set = set()
    input_bytes = [0]
    handles = []
    for i, layer in enumerate(lm.layers):
        def pre(module, args, kwargs, _i=i):
            current[0] = _i
            h = args[0] if args else kwargs.get("hidden_states")
            input_bytes[0] = h.numel() * h.element_size()
            # tensors every layer receives (rotary cos/sin, masks) are the outside's, whichever layer saves them
            shared.update(storage_key(t) for t in _tensors(kwargs) if t is not h)

        def post(module, args, kwargs, output, _i=i):
            current[0] = None
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    saved = SavedBytes(model, owner=lambda t: None if storage_key(t) in shared else current[0])
    # one counter over forward and backward (its module tracker books backward ops to the module only when it
    # saw the forward); the forward's counts are read before backward starts
    with flop_counter.FlopCounterMode(display=False) as counter:
        with saved:
            loss = model(input_ids=ids, labels=ids).loss
        fwd_layer = _module_flops(counter, layer_names)
        fwd_total = int(counter.get_total_flops())
        loss.backward()
    for h in handles:
        h.remove()
    bwd_layer = {k: v - fwd_layer[k] for k, v in _module_flops(counter, layer_names).items()}
    bwd_total = int(counter.get_total_flops()) - fwd_total
    per_saved, per_fwd, per_bwd = {}, {}, {}
    for i, state in enumerate(states):
        if state in per_saved:
            if (per_saved[state], per_bwd[state]) != (saved.by_owner.get(i, 0), bwd_layer[layer_names[i]]):
                raise RuntimeError(f"layers {states.index(state)} and {i} differ in state {state!r}")
            continue
        per_saved[state] = saved.by_owner.get(i, 0)
        per_fwd[state] = fwd_layer[layer_names[i]]
        per_bwd[state] = bwd_layer[layer_names[i]]
    if "below" not in per_saved:
        per_saved["below"], per_fwd["below"], per_bwd["below"] = 0, per_fwd["frozen"], 0
    if "lowest" not in per_saved:
        for d in (per_saved, per_fwd, per_bwd):
            d["lowest"] = d["trained"]
    layer0 = list(lm.layers[1].parameters())
    trainable0 = lm.params[1]
    in_layers = {id(p) for layer in lm.layers for p in layer.parameters()}
    outside = [p for p in model.parameters() if id(p) not in in_layers]
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    out_trainable = [p for p in outside if p.requires_grad]
    config = model.config if not hasattr(model, "get_base_model") else model.get_base_model().config
    costs = LayerCosts(
        num_layers=depth, batch=batch, seq=seq, saved=per_saved, fwd_flops=per_fwd, bwd_flops=per_bwd,
        layer_input_bytes=input_bytes[0], outside_saved=saved.by_owner.get(None, 0),
        outside_fwd_flops=fwd_total - sum(fwd_layer.values()),
        outside_bwd_flops=bwd_total - sum(bwd_layer.values()),
        layer_param_bytes=nbytes(layer0), layer_trainable_bytes=nbytes(trainable0),
        layer_trainable_tensors=len(trainable0), layer_trainable_numel=sum(p.numel() for p in trainable0),
        outside_trainable_numel=sum(p.numel() for p in out_trainable), outside_param_bytes=nbytes(outside),
        outside_trainable_bytes=nbytes(out_trainable), outside_trainable_tensors=len(out_trainable),
        vocab=int(config.vocab_size), hidden=int(config.hidden_size),
    )
    return costs


def layer_states(active: list[int], num_layers: int, train_outside: bool) -> list[str]:
    """The state of every layer in a step that trains ``active``."""
    lowest = min(active)
    act = set(active)
    out = []
    for i in range(num_layers):
        if i in act:
            out.append("trained" if (train_outside or i > lowest) else "lowest")
        elif i < lowest and not train_outside:
            out.append("below")
        else:
            out.append("frozen")
    return out


@dataclass
class StepCount:
    saved_bytes: int  # held at the start of backward (with checkpointing: layer inputs + outside)
    recompute_bytes: int  # checkpointing: one layer's saved tensors, rebuilt during backward
    fwd_flops: int
    bwd_flops: int  # with checkpointing, the recomputed forwards included
    backward_layers: int  # layers backward runs through


def step_count(costs: LayerCosts, active: list[int], *, train_outside: bool, checkpointing: bool) -> StepCount:
    """Counted costs of a step that trains ``active``, from the per-state counts."""
    states = layer_states(active, costs.num_layers, train_outside)
    with_bwd = [s for s in states if s != "below"]
    fwd = costs.outside_fwd_flops + sum(costs.fwd_flops[s] for s in states)
    bwd = costs.outside_bwd_flops + sum(costs.bwd_flops[s] for s in states)
    if checkpointing:
        saved = costs.outside_saved + len(with_bwd) * costs.layer_input_bytes
        recompute = max((costs.saved[s] for s in set(with_bwd)), default=0)
        bwd += sum(costs.fwd_flops[s] for s in with_bwd)
    else:
        saved = costs.outside_saved + sum(costs.saved[s] for s in states)
        recompute = 0
    return StepCount(saved_bytes=saved, recompute_bytes=recompute, fwd_flops=fwd, bwd_flops=bwd,
                     backward_layers=len(with_bwd))


def count_whole(setup: CountSetup, batch: int, seq: int, num_layers: int, active: list[int]) -> dict:
    """A direct count of a whole ``num_layers``-deep meta model training ``active`` (no per-layer
    decomposition): what :func:`step_count` must reproduce."""
    model = build_meta_model(setup, num_layers)
    apply_states(model, setup, active)
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    saved = SavedBytes(model)
    with flop_counter.FlopCounterMode(display=False) as counter:
        with saved:
            loss = model(input_ids=ids, labels=ids).loss
        fwd = int(counter.get_total_flops())
        loss.backward()
    return {"saved_bytes": saved.bytes, "fwd_flops": fwd, "bwd_flops": int(counter.get_total_flops()) - fwd}
