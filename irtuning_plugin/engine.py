"""The selection engine: which layers train now, and the score state behind the choice.

The engine knows nothing of Trainers or Axolotl. A driver (``LayerSelectionCallback`` for any
transformers Trainer) calls, per optimizer step:

    engine.begin(optimizer)          # once: checks, first selection
    engine.collect_scores()          # after backward, before the optimizer step
    row = engine.end_step(step)      # after the step: record, select the next layers, apply

Frozen layers get ``requires_grad=False`` and ``grad=None``, so AdamW neither steps nor decays them
and keeps their moments for when they return (``frozen_optimizer_state: keep``); ``cpu`` moves those
moments to CPU memory while the layer is frozen, ``drop`` deletes them. ``memory_account()`` gives the
exact bytes held in trainable parameters, gradients and optimizer state, on the accelerator and elsewhere.

``state_dict()`` / ``load_state_dict()`` hold everything the next choice depends on (scores, measured
flags, the active set, the generator, the strategy's own state), so a run resumed from a checkpoint
selects exactly what the uninterrupted run selects; ``begin(..., state=...)`` restores instead of
choosing afresh.

Non-finite gradient norms (NaN/inf) keep the reference's rule (the layer scores ``SENTINEL_SCORE`` =
1000, so it tends to be chosen again); the layers concerned are listed in each step's row
(``nonfinite_layers``) and the first such step is warned about once on the console.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from irtuning_kernels.dispatch import CheckedLayerGradNorms
from irtuning_plugin.config import PREFIX, SelectionConfig, selection_fingerprint
from irtuning_plugin.depth_floor import FLOOR_FROM_SALF, floor_of, floored_strategy, saved_floor
from irtuning_plugin.distributed import copies_over_ranks, is_sharded, local_part, mean_of_measured, sum_over_ranks
from irtuning_plugin.layer_map import LayerMap, build_layer_map, is_adapter_param, set_layers_trainable
from irtuning_plugin.offload import OptimizerStateOffload
from irtuning_plugin.preflight import scope_refusal
from irtuning_plugin.strategies import SENTINEL_SCORE, SelectionContext, get_strategy_class
from irtuning_plugin.strategies.base import StrategyConfigError
from irtuning_plugin.strategies.runtime import StrategyRuntime, TrainBatches

LOG = logging.getLogger(__name__)


class SelectionError(RuntimeError):
    """The engine cannot run in the setup it was given (raised before training starts)."""


def _has_adapters(model: nn.Module) -> bool:
    """The model carries LoRA/PEFT adapter tensors."""
    return any(is_adapter_param(name) for name, _ in model.named_parameters())


STATE_VERSION = 2  # 2 adds the fingerprint of the settings that shape the selection
READABLE_STATE_VERSIONS = (1, 2)
# What to do about a selection state that cannot be used (said in every such refusal).
STATE_ADVICE = ("remove that file to resume this checkpoint with the selection started afresh (irtuning warns), "
                 "or resume from another checkpoint")
_STATE_TENSORS = ("scores", "ever_measured", "fresh")


def _dist_world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class LayerSelectionEngine:
    def __init__(self, model: nn.Module, config: SelectionConfig, *, seed: int | None = None,
                 layer_map: LayerMap | None = None):
        self.config = config.check()
        self.model = model
        refused = scope_refusal(config.strategy, config.scope)  # the integrations' preflight says it first
        if refused:
            raise StrategyConfigError(refused)
        self.layer_map = layer_map or build_layer_map(model, config.scope, config.layers_path)
        L = self.layer_map.num_layers
        self.num_layers = L
        cls = get_strategy_class(config.strategy)
        self.strategy = floored_strategy(cls, config.build_options(), L, config.depth_floor,
                                         f"{PREFIX}{config.strategy}_")
        # seed: the caller's (the callback passes irtuning_seed or the training seed), else irtuning_seed, else 0;
        # with neither given, a restored state's seed is taken rather than compared
        self._seed_given = seed is not None or config.seed is not None
        self.seed = int(seed if seed is not None else config.seed if config.seed is not None else 0)
        self.generator = torch.Generator().manual_seed(self.seed)
        # what shapes the choice (saved with the state; a resume compares it with its own)
        self.fingerprint = selection_fingerprint(config, seed=self.seed, layers_path=self.layer_map.layers_path)
        self.config_changes: dict[str, dict[str, Any]] = {}  # set by a resume allowed to change settings
        self.scores = torch.full((L,), SENTINEL_SCORE, dtype=torch.float64)
        self.ever_measured = torch.zeros(L, dtype=torch.bool)
        self.fresh = torch.zeros(L, dtype=torch.bool)
        self.nonfinite = torch.zeros(L, dtype=torch.bool)  # measured this step with a NaN/inf norm
        self.nonfinite_warned = False
        self.active: list[int] = list(range(L))
        params, ids = self.layer_map.flat()
        self._params = params
        self._param_layer = ids
        self._init_sharding()
        self.scored_this_step = False
        self.step_skipped = False
        self._forward_hooks: list[Any] = []  # hooks the strategy added (through its runtime); removed by close()
        self._train_batches = TrainBatches()  # the dataloader of the selection under way, seen by the strategy
        self.last_score_seconds = 0.0
        self.last_select_seconds = 0.0
        self.backward_cut = False
        self.started = False
        self.last_row: dict | None = None
        self.optimizer: Any = None  # the torch optimizer (unwrapped from accelerate's), set by begin()
        # the gradient norms, with the Triton kernel's first-use self-check (irtuning_kernel_self_check)
        self.grad_norms = CheckedLayerGradNorms(config.kernel_backend, self_check=config.kernel_self_check)
        self.offload: OptimizerStateOffload | None = None  # frozen_optimizer_state: cpu, made at the first placement

    # ---- set-up -------------------------------------------------------------------------------
    def check_optimizer(self, optimizer: Any) -> None:
        """Every selectable parameter must be in the optimizer (else selecting it trains nothing)."""
        if optimizer is None:
            raise SelectionError("irtuning: the Trainer has no optimizer at train start; cannot check it")
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        held = {id(p) for group in inner.param_groups for p in group["params"]}
        missing = [(i, n) for i, (ps, ns) in enumerate(zip(self.layer_map.params, self.layer_map.names, strict=True))
                   for p, n in zip(ps, ns, strict=True) if id(p) not in held]
        if missing:
            layer, name = missing[0]
            if self.config.scope == "full" and _has_adapters(self.model):
                frozen = sum(1 for i, n in missing if not is_adapter_param(n))
                raise SelectionError(
                    f"irtuning: irtuning_scope='full' selects all of each layer's parameters, but this model carries "
                    f"LoRA/PEFT adapters and its base weights are frozen, so {frozen} of them are not in the "
                    f"optimizer (first: layer {layer} '{name}'): use irtuning_scope: adapter to select the adapter "
                    f"layers, or fine-tune the full model without an adapter")
            raise SelectionError(
                f"irtuning: {len(missing)} selectable parameters are not in the optimizer (first: layer {layer} "
                f"'{name}'); the optimizer must be built over every layer's trainable tensors before selection "
                f"freezes any (was it created after freezing, or with a custom parameter filter?)"
            )

    # Forward hooks that make the embedding output require grad: transformers' and peft's names.
    _INPUT_GRAD_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")

    def _input_grad_hooks(self) -> list[tuple[nn.Module, int]]:
        found = []
        for m in self.model.modules():
            for hid, fn in m._forward_hooks.items():
                if getattr(fn, "__name__", "") in self._INPUT_GRAD_HOOKS:
                    found.append((m, hid))
        return found

    def _cut_backward(self) -> None:
        """Remove every ``enable_input_require_grads`` hook so backprop stops at the lowest trained layer.

        Matched by function rather than through ``_require_grads_hooks``: each call of
        enable_input_require_grads (Axolotl's, then the Trainer's for gradient checkpointing) overwrites
        that list, so the bookkeeping only knows the last hook.
        """
        hooks = self._input_grad_hooks()
        if not hooks:
            return
        reentrant = False
        for m in self.layer_map.layers:
            func = getattr(m, "_gradient_checkpointing_func", None)
            if getattr(m, "gradient_checkpointing", False) and func is not None:
                # A wrapper marked irtuning_inputs_require_grad (LLaMA-Factory's) makes a trained layer's
                # input require grad itself, so reentrant checkpointing needs no hook.
                reentrant = (not getattr(func, "irtuning_inputs_require_grad", False)
                             and getattr(func, "keywords", {}).get("use_reentrant", True) is not False)
                break
        if reentrant:
            LOG.warning("irtuning: gradient checkpointing is reentrant, so the input-grad hook stays and the "
                        "backward pass runs down to layer 0; use gradient_checkpointing_kwargs: "
                        "{use_reentrant: false} to let it stop at the lowest trained layer")
            return
        for m, hid in hooks:
            m._forward_hooks.pop(hid, None)
            getattr(m, "_forward_hooks_with_kwargs", {}).pop(hid, None)
            getattr(m, "_forward_hooks_always_called", {}).pop(hid, None)
        for m in self.model.modules():
            own = vars(m)  # not getattr: PEFT wrappers forward attribute lookups to the base model
            if "_require_grads_hooks" in own:
                m._require_grads_hooks = []
            own.pop("_require_grads_hook", None)
        self.backward_cut = True
        LOG.info("irtuning: removed the embedding-output requires-grad hook; backprop stops at the lowest "
                 "trained layer")

    def check_layers(self) -> None:
        """Refuse layers with nothing selectable: a strategy would count them as trained slots (an IR layer
        never measured keeps score 1000 and is chosen every step) that train nothing. ``all`` is exempt:
        it chooses every layer anyway."""
        empty = self.layer_map.empty_layers
        if empty and get_strategy_class(self.config.strategy).freezes_layers:  # the class: a floored one is wrapped
            raise SelectionError(
                f"irtuning: decoder layer(s) {empty} of {self.num_layers} hold no selectable "
                f"{'trainable adapter ' if self.config.scope == 'adapter' else ''}tensors at train start (LoRA "
                f"not applied there, or frozen before training), so irtuning_strategy={self.strategy.name!r} "
                f"would count them as trained while they train nothing: apply the adapter to every decoder "
                f"layer (no layers_to_transform, no freezing), or use irtuning_strategy: all")

    def begin(self, optimizer: Any = None, train_dataloader: Any = None, *, check_optimizer: bool = True,
              state: dict | None = None, state_source: str | None = None) -> list[int]:
        """Check the set-up and choose the layers of the first step, or, given ``state`` (from
        :meth:`state_dict`, e.g. of a checkpoint; ``state_source`` names its file in errors), restore the
        selection it holds and apply it."""
        if check_optimizer:
            self.check_optimizer(optimizer)
        self.check_layers()
        self.optimizer = getattr(optimizer, "optimizer", optimizer)
        if self.config.cut_backward:
            self._cut_backward()
        self.strategy.setup(self.strategy_runtime())
        self.started = True
        if state is None:
            self._select(step=0, train_dataloader=train_dataloader)
        elif self.load_state_dict(state, source=state_source):
            # Settings changed on an allowed resume: the layers of the next step are chosen again under
            # them (by the rules of a run's first choice, from the restored scores).
            self._select(step=0, train_dataloader=train_dataloader)
        else:
            set_layers_trainable(self.layer_map, self.active)
            frozen = set(range(self.num_layers)) - set(self.active)
            self._place_optimizer_state(frozen=frozen, selected=set(self.active))
        return self.active

    # ---- checkpoint state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What the next choice depends on; tensors on CPU, plain Python otherwise (torch.save-able)."""
        return {
            "version": STATE_VERSION,
            "strategy": self.strategy.name,
            "num_layers": self.num_layers,
            "seed": self.seed,
            "scores": self.scores.clone(),
            "ever_measured": self.ever_measured.clone(),
            "fresh": self.fresh.clone(),
            "active": list(self.active),
            "generator": self.generator.get_state(),
            "nonfinite_warned": self.nonfinite_warned,
            "strategy_state": self.strategy.state_dict(),
            "fingerprint": dict(self.fingerprint),
        }

    def _check_state(self, state: Any, where: str) -> None:
        """The structure :meth:`state_dict` writes, or a one-line SelectionError naming ``where``."""
        def bad(what: str) -> SelectionError:
            return SelectionError(f"irtuning: {where} is not a usable selection state ({what}): {STATE_ADVICE}")

        if not isinstance(state, dict):
            raise bad(f"it holds a {type(state).__name__}, not a dict")
        if state.get("version") not in READABLE_STATE_VERSIONS:
            raise SelectionError(f"irtuning: {where} is a selection state of version {state.get('version')!r}; "
                                 f"this irtuning reads versions {', '.join(map(str, READABLE_STATE_VERSIONS))}: "
                                 f"{STATE_ADVICE}")
        required = ("strategy", "num_layers", *_STATE_TENSORS, "active", "generator")
        missing = [k for k in required if k not in state]
        if missing:
            raise bad(f"missing {', '.join(missing)}")
        n = state["num_layers"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise bad(f"num_layers={n!r}")
        for key in _STATE_TENSORS:
            t = state[key]
            if not torch.is_tensor(t) or tuple(t.shape) != (n,):
                raise bad(f"{key} is not a tensor of {n} layer values")
        active = state["active"]
        if (not isinstance(active, (list, tuple)) or not active
                or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in active)):
            raise bad(f"active={active!r} is not a non-empty list of layer indices below {n}")
        if not torch.is_tensor(state["generator"]) or state["generator"].dtype != torch.uint8:
            raise bad("generator is not a generator state")
        for key in ("strategy_state", "fingerprint"):
            if not isinstance(state.get(key) or {}, dict):
                raise bad(f"{key} is not a dict")

    def _changed_settings(self, state: dict, where: str) -> dict[str, dict[str, Any]]:
        """Keys of :attr:`fingerprint` whose value differs in ``state``: {key: {"old": ..., "new": ...}}."""
        saved = state.get("fingerprint")
        if not self._seed_given and isinstance(state.get("seed"), int):  # no seed asked for: the checkpoint's
            self.seed = self.fingerprint[PREFIX + "seed"] = state["seed"]
        if saved is None:  # a state of version 1: the depth floor is read from the strategy's state
            LOG.warning("irtuning: %s was written by an earlier irtuning that kept no fingerprint of its settings: "
                        "only the strategy, the layer count and the depth floor are compared with this run's",
                        where)
            mine = self.fingerprint[PREFIX + "depth_floor"]
            floor = saved_floor(state.get("strategy_state") or {})
            if floor != mine and not (mine == FLOOR_FROM_SALF and floor > 0):
                return {PREFIX + "depth_floor": {"old": floor, "new": mine}}
            return {}
        absent = "(absent)"
        return {k: {"old": saved.get(k, absent), "new": self.fingerprint.get(k, absent)}
                for k in sorted(set(saved) | set(self.fingerprint)) if saved.get(k, absent) != self.fingerprint.get(k, absent)}

    def load_state_dict(self, state: dict, source: str | None = None) -> bool:
        """Restore :meth:`state_dict`. Refused in one line (naming ``source``, the file) when the state is
        malformed, of another strategy or layer count, or made under other settings (unless
        irtuning_resume_allow_changed_config). True when the next step's layers must be chosen again: the
        settings changed (allowed), or the saved layers lie below the depth floor."""
        where = source or "the given selection state"
        self._check_state(state, where)
        for key, mine in (("strategy", self.strategy.name), ("num_layers", self.num_layers)):
            if state[key] != mine:
                raise SelectionError(f"irtuning: the checkpoint's selection state has {key}={state[key]!r} but "
                                     f"this run has {key}={mine!r}; resume with the same irtuning settings "
                                     f"({where})")
        changes = self._changed_settings(state, where)
        listed = ", ".join(f"{k} {c['old']!r} -> {c['new']!r}" for k, c in changes.items())
        if changes and not self.config.resume_allow_changed_config:
            raise SelectionError(
                f"irtuning: {where} was saved with other selection settings than this run's: {listed}; resume with "
                f"the checkpoint's values, or set {PREFIX}resume_allow_changed_config: true to go on with the new "
                f"ones")
        # with changed strategy options or floor, the strategy's own state belongs to other settings
        restart = any(k == PREFIX + "depth_floor" or k.startswith(f"{PREFIX}{self.strategy.name}_") for k in changes)
        self.scores = state["scores"].detach().to(torch.float64).cpu().clone()
        self.ever_measured = state["ever_measured"].detach().bool().cpu().clone()
        self.fresh = state["fresh"].detach().bool().cpu().clone()
        self.active = [int(i) for i in state["active"]]
        try:
            self.generator.set_state(state["generator"])
        except RuntimeError as err:
            raise SelectionError(f"irtuning: {where} is not a usable selection state (its generator state: "
                                 f"{err}): {STATE_ADVICE}") from None
        if PREFIX + "seed" in changes:  # the new seed takes effect
            self.generator.manual_seed(self.seed)
        self.nonfinite_warned = bool(state.get("nonfinite_warned", False))
        if not restart:
            try:
                self.strategy.load_state_dict(state.get("strategy_state") or {})
            except StrategyConfigError:
                raise
            except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, IndexError) as err:
                raise SelectionError(f"irtuning: {where}: the state of strategy {self.strategy.name!r} cannot be "
                                     f"restored ({type(err).__name__}: {err}): {STATE_ADVICE}") from None
        floor = floor_of(self.strategy)
        below = [i for i in self.active if floor is None or i < floor]
        if changes:
            self.config_changes = changes
            LOG.warning(
                "irtuning: RESUMING WITH CHANGED SELECTION SETTINGS (%sresume_allow_changed_config: true) from %s: "
                "%s; the steps so far were chosen under the old values, the rest under the new ones%s", PREFIX,
                where, listed, "; the strategy's own state restarts and the next step's layers are chosen again"
                if restart or below else "")
        elif below:  # only a malformed state gets here: the floor's contract holds whatever the flag
            raise SelectionError(f"irtuning: {where} has active layers {below} below {PREFIX}depth_floor={floor}, "
                                 f"which must never train: {STATE_ADVICE}")
        return restart or bool(below)

    # ---- FSDP2 checkpoints: every optimizer key present -------------------------------------------------
    @property
    def sharded(self) -> bool:
        """The selectable parameters are FSDP2 (``fully_shard``) DTensors."""
        return self._copies is not None

    def stateless_optimizer_params(self, optimizer: Any = None) -> list[torch.Tensor]:
        """The optimizer's parameters that hold no state now (never trained, or their state dropped)."""
        opt = getattr(optimizer, "optimizer", optimizer) if optimizer is not None else self.optimizer
        return [p for g in opt.param_groups for p in g["params"] if not opt.state.get(p)]

    def fill_initial_optimizer_state(self) -> list[torch.Tensor]:
        """Give each optimizer parameter without state the state Adam/AdamW would create on its first step
        (``_init_group``: ``step`` 0, zero ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq`` like the parameter),
        which steps exactly as no state does. torch.distributed.checkpoint's load (accelerate's FSDP2 resume)
        needs every parameter's keys in the checkpoint; call this just before the save and
        :meth:`drop_initial_optimizer_state` just after. Returns the parameters filled in; for an optimizer
        that is not Adam/AdamW, fills nothing and returns []."""
        if not isinstance(self.optimizer, torch.optim.Adam):  # AdamW derives from Adam
            return []
        from torch.optim.optimizer import _get_scalar_dtype

        filled = []
        for group in self.optimizer.param_groups:
            on_device = group.get("capturable") or group.get("fused")
            for p in group["params"]:
                if self.optimizer.state.get(p):
                    continue
                st = self.optimizer.state[p]
                st["step"] = (torch.zeros((), dtype=_get_scalar_dtype(is_fused=group.get("fused")), device=p.device)
                              if on_device else torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu"))
                moments = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group.get("amsgrad") else ("exp_avg", "exp_avg_sq")
                for key in moments:
                    st[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                filled.append(p)
        return filled

    def drop_initial_optimizer_state(self, params: list[torch.Tensor] | None = None, optimizer: Any = None) -> int:
        """Delete the optimizer state of ``params`` (default: every optimizer parameter) whose ``step`` is
        still 0: a state no optimizer step touched, which is the same as none (the initial state that
        :meth:`fill_initial_optimizer_state` made for a save, or a resumed checkpoint holds). Returns how many."""
        opt = getattr(optimizer, "optimizer", optimizer) if optimizer is not None else self.optimizer
        if params is None:
            params = [p for g in opt.param_groups for p in g["params"]]
        dropped = 0
        for p in params:
            step = opt.state.get(p, {}).get("step")
            if step is not None and float(step) == 0.0:
                del opt.state[p]
                dropped += 1
        return dropped

    # ---- per step -----------------------------------------------------------------------------
    def collect_scores(self, *, step_skipped: bool = False) -> torch.Tensor:
        """Score every layer that has gradients now; others keep their last (stale) score.

        ``step_skipped``: the optimizer will skip this step (an fp16 loss-scaler overflow), so no score
        changes: the gradients are inf/NaN artefacts of the scale, not of the layers.
        """
        t0 = time.perf_counter()
        fresh = torch.zeros(self.num_layers, dtype=torch.bool)
        nonfinite = torch.zeros(self.num_layers, dtype=torch.bool)
        self.step_skipped = bool(step_skipped)
        if self._copies is not None:  # FSDP2: local shards, one all_reduce
            per_tensor_sq, ids, measured, self.step_skipped = self._sharded_norms(self.step_skipped)
            if not self.step_skipped:
                per_layer = torch.zeros(self.num_layers, dtype=torch.float64).index_add_(0, ids, per_tensor_sq)
                nonfinite = measured & ~torch.isfinite(per_layer)
                fresh = self._strategy_scores(per_tensor_sq, ids, measured)
        elif not step_skipped:
            grads, ids = [], []
            for p, lid in zip(self._params, self._param_layer, strict=True):
                if p.grad is not None:
                    grads.append(p.grad)
                    ids.append(lid)
            if grads:
                res = self.grad_norms(grads, ids, self.num_layers)
                per_tensor_sq, measured = res.per_tensor_sq, res.measured.cpu()
                # NaN/inf gradient norms (a skipped fp16 step's overflow is not one: it is never scored)
                nonfinite = measured & ~torch.isfinite(res.per_layer_sq.detach().cpu())
            else:
                per_tensor_sq, measured = torch.zeros(0, dtype=torch.float64), fresh
            fresh = self._strategy_scores(per_tensor_sq, torch.as_tensor(ids, dtype=torch.long), measured)
        self.fresh = fresh
        self.nonfinite = nonfinite
        self.ever_measured |= fresh
        self.scored_this_step = True
        self.last_score_seconds = time.perf_counter() - t0
        return self.scores

    def _strategy_scores(self, per_tensor_sq: torch.Tensor, ids: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
        """Store the strategy's scores of this step; returns which layers they measured."""
        layer_scores, fresh = self.strategy.step_scores(per_tensor_sq, ids, measured)
        if self._per_rank_scores:  # each rank's own batch: every rank takes the mean over ranks
            layer_scores, fresh = mean_of_measured(layer_scores, fresh)
        self.scores[fresh] = layer_scores[fresh].double()
        return fresh

    # ---- several ranks ------------------------------------------------------------------------
    def _init_sharding(self) -> None:
        """Find FSDP2 (DTensor) parameters among the selectable ones, and which scores differ by rank."""
        names = [n for ns in self.layer_map.names for n in ns]
        self._copies: torch.Tensor | None = None
        if any(is_sharded(p) for p in self._params):
            try:
                self._copies = copies_over_ranks(self._params, names)
            except ValueError as err:
                raise SelectionError(f"irtuning: {err}") from None
        # scores taken from each rank's own batch (ir's cosine) are averaged over ranks; gradient scores are not
        self._per_rank_scores = (_dist_world()[0] > 1 and get_strategy_class(self.config.strategy)
                                 .scores_from_own_batch(self.config.build_options()))

    def _sharded_norms(self, step_skipped: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """Per-tensor squared norms of sharded gradients: each rank sums squares over its local shards
        (``to_local()``, possibly empty), then one all_reduce of 2 n + 1 floats (the sums, which tensors
        have a gradient, whether any rank skips the step) makes them exact and the same on every rank.

        Returns (per_tensor_sq, layer ids, measured layers, step skipped) for the tensors with gradients,
        in the engine's parameter order, as the one-process path gives them."""
        n = len(self._params)
        has_grad = torch.zeros(n, dtype=torch.float64)
        local, where = [], []
        for k, p in enumerate(self._params):
            if p.grad is None:
                continue
            has_grad[k] = 1.0
            g = local_part(p.grad)
            if g.numel() and not step_skipped:  # an uneven shard can be empty on this rank: it adds 0
                local.append(g)
                where.append(k)
        sq = torch.zeros(n, dtype=torch.float64)
        if local:
            res = self.grad_norms(local, [self._param_layer[k] for k in where], self.num_layers)
            sq[where] = res.per_tensor_sq.detach().double().cpu()
        total = sum_over_ranks(torch.cat([sq / self._copies, has_grad, torch.tensor([float(step_skipped)])]))
        skipped = bool(total[-1] > 0)
        with_grad = total[n:2 * n] > 0  # a gradient on any rank (FSDP2 gives every rank one, maybe empty)
        ids = torch.as_tensor(self._param_layer, dtype=torch.long)[with_grad]
        measured = torch.zeros(self.num_layers, dtype=torch.bool)
        measured[ids] = True
        return total[:n][with_grad], ids, measured, skipped

    def end_step(self, step: int, train_dataloader: Any = None) -> dict:
        """Record the step that just ended and choose (and apply) the layers of the next one."""
        if not self.scored_this_step:
            self.fresh = torch.zeros(self.num_layers, dtype=torch.bool)
            self.nonfinite = torch.zeros(self.num_layers, dtype=torch.bool)
        nonfinite = [i for i in range(self.num_layers) if bool(self.nonfinite[i])]
        if nonfinite and not self.nonfinite_warned:
            self.nonfinite_warned = True
            LOG.warning("irtuning: NON-FINITE (NaN/inf) gradient norms at optimizer step %d in layer(s) %s: they "
                        "score %s (the reference's rule), so they tend to be chosen again; training has likely "
                        "diverged (learning rate too high? fp16 overflow?). Each step's nonfinite_layers field in "
                        "irtuning_selection.jsonl lists them; this warning is shown once.",
                        step, nonfinite, SENTINEL_SCORE)
        row = {
            "step": int(step),
            "active": list(self.active),
            "n_active": len(self.active),
            "lowest_active": min(self.active) if self.active else None,
            "scores": [round(float(s), 6) for s in self.scores],
            "fresh": [i for i in range(self.num_layers) if bool(self.fresh[i])],
            "nonfinite_layers": nonfinite,
            "score_ms": round(self.last_score_seconds * 1e3, 3),
        }
        if self.step_skipped:
            row["optimizer_step_skipped"] = True
        self._select(step=step, train_dataloader=train_dataloader)
        row.update(self.strategy.log_fields())
        row["select_ms"] = round(self.last_select_seconds * 1e3, 3)
        row["next_active"] = list(self.active)
        if self.config.frozen_optimizer_state == "cpu":  # what this selection sent each way (asynchronously)
            row["offload_d2h_bytes"] = self.offload.last_d2h_bytes if self.offload else 0
            row["offload_h2d_bytes"] = self.offload.last_h2d_bytes if self.offload else 0
        self.scored_this_step = False
        self.step_skipped = False
        self.last_row = row
        return row

    def strategy_runtime(self) -> StrategyRuntime:
        """What the strategy may use of this run (given to its ``setup`` at train start): the model, every
        decoder layer, the scope, the seed as it is now, the trainable parameters outside the layers, hooks
        that :meth:`close` removes, and the training dataloader of each selection."""
        return StrategyRuntime(model=self.model, layers=tuple(self.layer_map.layers), scope=self.config.scope,
                               seed=self.seed, outside_trainable=tuple(self.layer_map.outside_trainable),
                               hook_handles=self._forward_hooks, batches=self._train_batches)

    def add_layer_forward_hook(self, hook) -> None:
        """Call ``hook(layer_index, module, args, kwargs, output)`` after every forward of a decoder layer
        (for scores that are not gradients, e.g. ``ir``'s cosine); removed by :meth:`close`."""
        self.strategy_runtime().add_layer_forward_hook(hook)

    def close(self) -> None:
        """Remove the hooks the engine put on the model and the optimizer (at train end); wait for the
        offload's pending copies."""
        for handle in self._forward_hooks:
            handle.remove()
        self._forward_hooks.clear()
        if self.offload is not None:
            self.offload.close()

    def _select(self, step: int, train_dataloader: Any = None) -> None:
        t0 = time.perf_counter()
        ctx = SelectionContext(
            step=step, num_layers=self.num_layers, scores=self.scores.clone(),
            ever_measured=self.ever_measured.clone(), fresh=self.fresh.clone(), active=list(self.active),
            generator=self.generator,
        )
        self._train_batches.dataloader = train_dataloader
        chosen = sorted({int(i) for i in self.strategy.select(ctx)})
        if not chosen or chosen[0] < 0 or chosen[-1] >= self.num_layers:
            raise SelectionError(f"strategy {self.strategy.name!r} chose invalid layers {chosen}")
        chosen = self._same_on_every_rank(chosen)
        set_layers_trainable(self.layer_map, chosen)
        self._place_optimizer_state(frozen=set(self.active) - set(chosen), selected=set(chosen) - set(self.active))
        self.active = chosen
        self.last_select_seconds = time.perf_counter() - t0

    def _place_optimizer_state(self, frozen: set[int], selected: set[int]) -> None:
        """Apply ``frozen_optimizer_state`` to the layers frozen / selected again by this selection.

        ``cpu``: the copies are only issued here (a side stream on CUDA); the optimizer's step pre-hook
        makes the training stream wait for them before ``optimizer.step()`` (see offload.py)."""
        mode = self.config.frozen_optimizer_state
        if mode == "keep" or self.optimizer is None:
            return
        state = self.optimizer.state
        if mode == "drop":
            for layer in sorted(frozen):
                for p in self.layer_map.params[layer]:
                    if p in state:
                        del state[p]
            return
        if self.offload is None or self.offload.optimizer is not self.optimizer:
            if self.offload is not None:  # a second begin() with another optimizer
                self.offload.close()
            self.offload = OptimizerStateOffload(self.optimizer)
        params = self.layer_map.params
        self.offload.move(to_host=[p for i in sorted(frozen) for p in params[i]],
                          to_device=[p for i in sorted(selected) for p in params[i]])

    def run_facts(self) -> dict[str, Any]:
        """What irtuning_run.json reports about the kernel (self-check, fallback) and the offload totals."""
        facts: dict[str, Any] = self.grad_norms.facts()
        if self.config.frozen_optimizer_state == "cpu":
            off = self.offload
            facts.update(offload_d2h_bytes_total=off.total_d2h_bytes if off else 0,
                         offload_h2d_bytes_total=off.total_h2d_bytes if off else 0,
                         offload_host_buffer_bytes=off.host_buffer_bytes() if off else 0)
        return facts

    def memory_account(self) -> dict[str, int]:
        """Exact bytes now held in trainable parameters, their gradients and the optimizer state, split
        into ``*_accelerator`` (any non-CPU device) and ``*_host`` (CPU).

        ``optimizer_state_bytes_offloaded``: the part of the optimizer state that ``frozen_optimizer_state:
        cpu`` keeps off the training device (the state of frozen layers). It lies in ``*_host``; on a
        CPU-only machine the move changes nothing, and this key still tells that state from what stays.
        ``offload_host_buffer_bytes``: the host buffers ``cpu`` holds (pinned on CUDA machines), one per state
        tensor that ever left the device: the frozen layers' state lives in them, the rest wait for reuse.
        Under FSDP2 each rank counts what it holds: the local shards of DTensor parameters, gradients and
        state."""
        out = {f"{what}_{where}": 0 for what in ("trainable_param_bytes", "grad_bytes", "optimizer_state_bytes")
               for where in ("accelerator", "host")}
        out["optimizer_state_bytes_offloaded"] = 0
        out["offload_host_buffer_bytes"] = self.offload.host_buffer_bytes() if self.offload is not None else 0

        def add(what: str, t: torch.Tensor) -> None:
            t = local_part(t)
            out[f"{what}_{'host' if t.device.type == 'cpu' else 'accelerator'}"] += t.numel() * t.element_size()

        for p in self.model.parameters():
            if p.requires_grad:
                add("trainable_param_bytes", p)
            if p.grad is not None:
                add("grad_bytes", p.grad)
        offloaded: set[int] = set()
        if self.config.frozen_optimizer_state == "cpu":
            active = set(self.active)
            offloaded = {id(p) for i, ps in enumerate(self.layer_map.params) if i not in active for p in ps}
        if self.optimizer is not None:
            for p, st in self.optimizer.state.items():
                for v in st.values():
                    if torch.is_tensor(v):
                        add("optimizer_state_bytes", v)
                        if id(p) in offloaded:
                            v = local_part(v)
                            out["optimizer_state_bytes_offloaded"] += v.numel() * v.element_size()
        return out

    def _same_on_every_rank(self, chosen: list[int]) -> list[int]:
        world, _ = _dist_world()
        if world == 1:
            return chosen
        backend = torch.distributed.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        mask = torch.zeros(self.num_layers, dtype=torch.uint8, device=device)
        mask[chosen] = 1
        torch.distributed.broadcast(mask, src=0)
        agreed = mask.nonzero().flatten().cpu().tolist()
        if agreed != chosen and not getattr(self, "_rank_divergence_warned", False):
            # Signals are combined across ranks before the choice, so this means a strategy's state drifted.
            self._rank_divergence_warned = True
            LOG.warning("irtuning: rank %d chose layers %s but rank 0 chose %s; rank 0's choice is used on every "
                        "rank (warned once)", _dist_world()[1], chosen, agreed)
        return agreed

    def metrics(self, per_layer: bool = False) -> dict[str, float]:
        """Figures of the optimizer step that ended last (what the Trainer logs next to its loss)."""
        active = self.last_row["active"] if self.last_row else self.active
        out = {
            "irtuning/active_layers": float(len(active)),
            "irtuning/lowest_active": float(min(active)) if active else -1.0,
        }
        if per_layer:
            for i, s in enumerate(self.scores.tolist()):
                out[f"irtuning/score_{i:02d}"] = float(s)
        return out
