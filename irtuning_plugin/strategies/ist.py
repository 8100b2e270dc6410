"""``ist``: Importance-aware Sparse Tuning (Yao et al., Findings of EMNLP 2024).

Each layer has a score ``s`` (0 at the start; high = damping the layer did not hurt = less important).
Every step ``int(train_fraction * L)`` layers train, sampled without replacement with weights
``sigmoid(-s)``. Every ``update_every`` steps from step ``first_update`` on, ``candidates`` sets of
``int(suppress_fraction * L)`` layers (weights ``sigmoid(s)``, a set equal to an earlier one is drawn
again) each get their LoRA output scaled by ``suppress_factor`` for one eval-mode forward pass on
``estimation_batch`` training examples; the rewards ``exp(-loss)`` move the scores (:func:`ist_score_update`).
Defaults are the reference's constants (docs/strategies.md). The extra forward passes run
inside :meth:`ISTStrategy.select`, so they count in the step's ``select_ms``.

Deliberate differences from the reference: the estimation examples are drawn from the Trainer's
training dataset (its ``collate_fn``) in a seeded shuffled order of our own, so the Trainer's data
order is untouched; they are run in micro-batches of the training micro-batch size (the loss is the
example-weighted mean of the micro-batch losses, equal to the reference's one-batch loss whenever the
micro-batch holds all of them); an iterable dataset is read from a second pass over the dataloader, in
whole batches until at least ``estimation_batch`` examples. Redrawing a set equal to an earlier one
stops after 1000 tries (the duplicate is then kept, with a warning).
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from irtuning_plugin.distributed import mean_over_ranks
from irtuning_plugin.strategies.base import (
    SelectionContext,
    SelectionStrategy,
    StrategyConfigError,
    option,
    register_strategy,
    sample_without_replacement,
)

if TYPE_CHECKING:  # pragma: no cover
    from irtuning_plugin.strategies.runtime import StrategyRuntime

LOG = logging.getLogger(__name__)

MAX_RESAMPLE_TRIES = 1000


def ist_score_update(scores: torch.Tensor, candidate_sets: Sequence[Sequence[int]], losses: Sequence[float],
                     lr: float = 10.0) -> torch.Tensor:
    """IST's importance update; returns new scores (fp64), ``scores`` is not modified.

    ``R_k = exp(-loss_k)``, ``A_k = R_k - mean(R)``, ``p = sigmoid(scores)`` before the update; for each
    set ``k`` and layer ``i`` in it: ``s[i] += A_k * p_i * (1 - p_i) * lr``.
    """
    if len(candidate_sets) != len(losses):
        raise ValueError(f"{len(candidate_sets)} candidate sets for {len(losses)} losses")
    s = scores.detach().double().cpu().clone()
    rewards = torch.exp(-torch.as_tensor([float(x) for x in losses], dtype=torch.float64))
    advantage = rewards - rewards.mean()
    p = torch.sigmoid(s)
    step = torch.zeros_like(s)
    for a, layers in zip(advantage, candidate_sets, strict=True):
        step[torch.as_tensor(sorted({int(i) for i in layers}), dtype=torch.long)] += a
    return s + step * p * (1 - p) * float(lr)


def sample_suppression_sets(scores: torch.Tensor, size: int, count: int, generator: torch.Generator,
                            max_tries: int = MAX_RESAMPLE_TRIES) -> list[list[int]]:
    """``count`` sets of ``size`` layers, weights ``sigmoid(scores)``, no replacement within a set; a set
    equal to an earlier one is drawn again (up to ``max_tries`` times)."""
    weights = torch.sigmoid(scores.detach().double().cpu())
    sets: list[list[int]] = []
    for _ in range(count):
        for _try in range(max_tries):
            chosen = sample_without_replacement(len(weights), size, generator, weights)
            if chosen not in sets:
                break
        else:
            LOG.warning("irtuning ist: no new suppression set in %d draws; keeping a repeated one %s",
                        max_tries, chosen)
        sets.append(chosen)
    return sets


def lora_modules(layer: nn.Module) -> list[nn.Module]:
    """PEFT LoRA modules of a decoder layer: those with a per-adapter ``scaling`` dict and ``lora_A``."""
    return [m for m in layer.modules() if isinstance(vars(m).get("scaling"), dict) and "lora_A" in m._modules]


@contextmanager
def scaled_lora_output(layers: Iterable[nn.Module], factor: float) -> Iterator[int]:
    """Multiply the LoRA ``scaling`` of every adapter in ``layers`` by ``factor``; restored on exit."""
    saved = []
    try:
        for layer in layers:
            for m in lora_modules(layer):
                saved.append((m, dict(m.scaling)))
                for name in list(m.scaling):
                    m.scaling[name] = m.scaling[name] * factor
        yield len(saved)
    finally:
        for m, original in saved:
            m.scaling.update(original)


def _num_examples(batch: Any) -> int:
    for v in (batch.values() if isinstance(batch, dict) else []):
        if torch.is_tensor(v) and v.dim() > 0:
            return int(v.shape[0])
    return 1


class EstimationData:
    """Draws the examples of an importance update from the Trainer's training dataloader.

    A map-style dataset is read through its ``collate_fn`` in a shuffled order from ``generator`` (a new
    permutation when one is used up), in micro-batches of the dataloader's batch size; an iterable one
    through a second pass over the dataloader.
    """

    def __init__(self, dataloader: Any, n_examples: int, generator: torch.Generator):
        self.dataloader = dataloader
        self.n_examples = int(n_examples)
        self.generator = generator
        self.dataset = getattr(dataloader, "dataset", None)
        self.map_style = (self.dataset is not None and not isinstance(self.dataset, torch.utils.data.IterableDataset)
                          and hasattr(self.dataset, "__getitem__") and hasattr(self.dataset, "__len__"))
        self.collate = getattr(dataloader, "collate_fn", None) or torch.utils.data.default_collate
        bs = getattr(dataloader, "batch_size", None) or getattr(getattr(dataloader, "batch_sampler", None),
                                                               "batch_size", None)
        self.micro_batch = max(1, min(int(bs), self.n_examples)) if bs else self.n_examples
        self._order: list[int] = []
        self._iter = None

    def _next_indices(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.n_examples:
            if not self._order:
                self._order = torch.randperm(len(self.dataset), generator=self.generator).tolist()
            out.append(self._order.pop(0))
        return out

    def batches(self) -> list[Any]:
        if self.map_style:
            idx = self._next_indices()
            return [self.collate([self.dataset[i] for i in idx[j:j + self.micro_batch]])
                    for j in range(0, len(idx), self.micro_batch)]
        out, seen = [], 0
        while seen < self.n_examples:
            try:
                batch = next(self._iter) if self._iter is not None else None
            except StopIteration:
                batch = None
            if batch is None:
                self._iter = iter(self.dataloader)
                batch = next(self._iter)
            out.append(batch)
            seen += _num_examples(batch)
        return out


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict) or hasattr(batch, "items"):
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    raise TypeError(f"irtuning ist: a training batch must be a mapping of model inputs, got {type(batch).__name__}")


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Sequence[Any]) -> float:
    """Example-weighted mean of the model's loss over ``batches`` (no gradients)."""
    device = next(model.parameters()).device
    total, weight = 0.0, 0
    for batch in batches:
        out = model(**_to_device(batch, device))
        loss = out["loss"] if isinstance(out, dict) else getattr(out, "loss", None)
        if loss is None:
            raise RuntimeError("irtuning ist: the model returned no loss on a training batch (no labels?); "
                               "the importance update needs one")
        n = _num_examples(batch)
        total += float(loss) * n
        weight += n
    return total / max(weight, 1)


def _fraction_count(prefix: str, key: str, value: Any, num_layers: int | None) -> None:
    if not 0.0 < float(value) <= 1.0:
        raise StrategyConfigError(f"{prefix}{key}={value!r}; must be a fraction in (0, 1]")
    if num_layers is not None and int(float(value) * num_layers) < 1:
        raise StrategyConfigError(f"{prefix}{key}={value} selects int({value} * {num_layers}) = 0 of the "
                                  f"model's {num_layers} layers; raise it to at least {1 / num_layers:.3g}")


def _positive_int(prefix: str, key: str, value: Any, minimum: int = 1) -> None:
    if value < minimum:
        raise StrategyConfigError(f"{prefix}{key}={value!r}; must be a whole number >= {minimum}")


@dataclass
class ISTOptions:
    train_fraction: float = option(0.25, "fraction of the layers trained per step: int(fraction * L), sampled "
                                   "with weights sigmoid(-score)")
    suppress_fraction: float = option(0.5, "fraction of the layers damped in each candidate set of an "
                                      "importance update: int(fraction * L), weights sigmoid(score)")
    candidates: int = option(3, "candidate sets (extra forward passes) per importance update")
    suppress_factor: float = option(0.25, "factor on the LoRA output of a candidate set's layers")
    update_every: int = option(10, "importance update every this many optimizer steps")
    first_update: int = option(10, "optimizer step of the first importance update")
    estimation_batch: int = option(16, "training examples in each importance update's forward passes")
    lr: float = option(10.0, "step size of the score update")

    def check(self, prefix: str, num_layers: int | None = None) -> None:
        _fraction_count(prefix, "train_fraction", self.train_fraction, num_layers)
        _fraction_count(prefix, "suppress_fraction", self.suppress_fraction, num_layers)
        _positive_int(prefix, "candidates", self.candidates, minimum=2)
        if num_layers is not None:
            size = int(float(self.suppress_fraction) * num_layers)
            if math.comb(num_layers, size) < self.candidates:
                raise StrategyConfigError(
                    f"{prefix}candidates={self.candidates}: only {math.comb(num_layers, size)} distinct sets of "
                    f"{size} of the model's {num_layers} layers exist"
                )
        factor = self.suppress_factor
        if not 0.0 <= float(factor) < 1.0:
            raise StrategyConfigError(f"{prefix}suppress_factor={factor!r}; must be in [0, 1)")
        _positive_int(prefix, "update_every", self.update_every)
        _positive_int(prefix, "first_update", self.first_update)
        _positive_int(prefix, "estimation_batch", self.estimation_batch)
        if not float(self.lr) > 0.0:
            raise StrategyConfigError(f"{prefix}lr={self.lr!r}; must be > 0")


@register_strategy
class ISTStrategy(SelectionStrategy):
    name = "ist"
    Options = ISTOptions
    summary = ("IST: layers sampled by learned importance; every 10 steps 3 damped forward passes update "
               "the importance (adapters only)")
    scopes = ("adapter",)  # damping works on the LoRA output scaling

    def __init__(self, num_layers: int, options: Any = None):
        super().__init__(num_layers, options)
        self.importance = torch.zeros(num_layers, dtype=torch.float64)
        self.data: EstimationData | None = None
        self._data_generator: torch.Generator | None = None
        self._last_update: dict | None = None
        self._pending_order: list[int] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Importance scores, the estimation generator and what is left of its shuffled order (an iterable
        dataset's position in its second pass is not saved: after a resume that pass starts again)."""
        return {
            "importance": self.importance.clone(),
            "data_generator": None if self._data_generator is None else self._data_generator.get_state(),
            "data_order": list(self.data._order) if self.data is not None else self._pending_order,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.importance = state["importance"].detach().to(torch.float64).cpu().clone()
        if state.get("data_generator") is not None:
            if self._data_generator is None:
                self._data_generator = torch.Generator()
            self._data_generator.set_state(state["data_generator"])
        order = state.get("data_order")
        self._pending_order = None if order is None else [int(i) for i in order]
        if self.data is not None and self._pending_order is not None:
            self.data._order = self._pending_order

    def setup(self, runtime: "StrategyRuntime") -> None:
        # every integration refuses another scope before training (preflight's strategy-scope rule)
        assert runtime.scope in self.scopes, f"irtuning_scope={runtime.scope!r} reached ist"
        for i, layer in enumerate(runtime.layers):
            if not lora_modules(layer):
                raise StrategyConfigError(
                    f"irtuning_strategy=ist damps each layer by scaling its LoRA output, but decoder layer {i} "
                    f"has no PEFT LoRA module (with a `scaling` dict): apply LoRA to every layer"
                )
        super().setup(runtime)
        self._data_generator = torch.Generator().manual_seed(runtime.seed + 1)

    def _is_update_step(self, step: int) -> bool:
        first, every = int(self.options.first_update), int(self.options.update_every)
        return step >= first and (step - first) % every == 0

    def update_importance(self, model: nn.Module, layers: Sequence[nn.Module], generator: torch.Generator) -> dict:
        """One importance update on the next estimation examples; returns what it did (for the log)."""
        opts = self.options
        size = int(float(opts.suppress_fraction) * self.num_layers)
        sets = sample_suppression_sets(self.importance, size, int(opts.candidates), generator)
        batches = self.data.batches()
        losses = []
        was_training = model.training
        model.eval()
        try:
            for chosen in sets:
                with scaled_lora_output([layers[i] for i in chosen], float(opts.suppress_factor)):
                    losses.append(mean_loss(model, batches))
        finally:
            model.train(was_training)
        # Under DDP each rank ran its own passes (an iterable dataset gives each rank other examples): the
        # update uses the mean over ranks, so every rank keeps the same importance.
        losses = mean_over_ranks(losses)
        self.importance = ist_score_update(self.importance, sets, losses, float(opts.lr))
        return {"suppressed": sets, "losses": [round(x, 6) for x in losses],
                "importance": [round(float(x), 6) for x in self.importance]}

    def select(self, ctx: SelectionContext) -> list[int]:
        runtime = self.runtime
        if self.data is None:
            if runtime is None or runtime.train_dataloader is None:
                raise StrategyConfigError("irtuning_strategy=ist needs the Trainer's training dataloader (for its "
                                          "importance updates); drive the engine through LayerSelectionCallback")
            self.data = EstimationData(runtime.train_dataloader, int(self.options.estimation_batch),
                                       self._data_generator or torch.Generator().manual_seed(runtime.seed + 1))
            if self._pending_order is not None:
                self.data._order = list(self._pending_order)
        if self._is_update_step(ctx.step):
            self._last_update = self.update_importance(runtime.model, runtime.layers, ctx.generator)
        n_train = int(float(self.options.train_fraction) * ctx.num_layers)
        return sample_without_replacement(ctx.num_layers, n_train, ctx.generator, torch.sigmoid(-self.importance))

    def log_fields(self) -> dict[str, Any]:
        if self._last_update is None:
            return {}
        row, self._last_update = {"ist_update": self._last_update}, None
        return row
