"""What a strategy may use of the run it selects layers for: :class:`StrategyRuntime`.

The engine builds one when training starts and hands it to :meth:`SelectionStrategy.setup`. It holds the
model, the decoder layers the strategy chooses among (numbered ``0..num_layers-1`` in the strategy's own
numbering), the scope, the seed, the trainable parameters outside the layers, a way to add a forward hook
to those layers, and a way to read a few training batches without moving the Trainer's data order.
Nothing in it leads back to the engine: scores, the optimizer side and the broadcast stay there.

:meth:`StrategyRuntime.above` gives the same run seen from above a depth floor: only the layers
``floor..L-1``, renumbered from 0 (what a strategy wrapped by the depth floor is set up with).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import torch
from torch import nn

# hook(layer_index, module, args, kwargs, output), the index in the runtime's own numbering
LayerHook = Callable[[int, nn.Module, tuple, dict, Any], None]


class TrainBatches:
    """The training dataloader the driver gave the engine for the selection under way (``None`` when it
    gave none). One object is shared by a runtime and its sliced copies; the engine sets it before each
    selection."""

    def __init__(self, dataloader: Any = None):
        self.dataloader = dataloader


@contextlib.contextmanager
def _rng_untouched(loader: Any) -> Iterator[None]:
    """Reading batches draws from the global RNG (the sampler's and the workers' seeds) and from any
    generator the loader or its sampler owns: restore them all, so training sees the same batches, in the
    same order, as without the read."""
    owners = [loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)]
    generators = {id(g): g for g in (getattr(o, "generator", None) for o in owners) if isinstance(g, torch.Generator)}
    states = [(g, g.get_state()) for g in generators.values()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            for g, state in states:
                g.set_state(state)


@dataclass(frozen=True)
class StrategyRuntime:
    """The model and layers one strategy works over, and the few services it may call."""

    model: nn.Module
    layers: tuple[nn.Module, ...]  # the decoder blocks the strategy chooses among, in its numbering
    scope: str  # irtuning_scope: "adapter" or "full"
    seed: int  # the run's selection seed (irtuning_seed or the training seed)
    outside_trainable: tuple[str, ...] = ()  # names of trainable parameters outside every decoder layer
    first_layer: int = 0  # the model's index of layers[0] (the depth floor of a sliced copy)
    # handles of the hooks added through this runtime or its copies; the engine removes them at train end
    hook_handles: list = field(default_factory=list, repr=False)
    batches: TrainBatches = field(default_factory=TrainBatches, repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def train_dataloader(self) -> Any:
        """The Trainer's training dataloader for the selection under way, or ``None`` if the driver gave none."""
        return self.batches.dataloader

    def add_layer_forward_hook(self, hook: LayerHook) -> None:
        """Call ``hook(i, module, args, kwargs, output)`` after every forward of layer ``i`` (this runtime's
        numbering) of :attr:`layers`; removed by the engine at train end."""
        for i, layer in enumerate(self.layers):
            def fn(module, args, kwargs, output, _i=i):
                hook(_i, module, args, kwargs, output)
            self.hook_handles.append(layer.register_forward_hook(fn, with_kwargs=True))

    @contextlib.contextmanager
    def peek_batches(self, n: int) -> Iterator[Iterator[Any]]:
        """The first ``n`` batches of a fresh pass over the training dataloader, read inside the block.

        The global RNG and the loader's own generators are restored on exit, so the Trainer's batches and
        their order stay what they would be without the read. Accelerate's wrapper is bypassed (its plain
        torch DataLoader is read): leaving the wrapper's iterator early would keep it registered as the
        active dataloader in accelerate's GradientState."""
        loader = self.train_dataloader
        if loader is None:
            raise ValueError("no training dataloader was given to the engine for this selection")
        loader = getattr(loader, "base_dataloader", loader)
        with _rng_untouched(loader):
            yield itertools.islice(iter(loader), int(n))

    def above(self, floor: int) -> "StrategyRuntime":
        """This runtime over the layers ``floor..num_layers-1`` only, renumbered from 0; it shares the hook
        handles and the training batches with this one."""
        if not 0 <= floor < self.num_layers:
            raise ValueError(f"a floor of {floor} leaves no layer of {self.num_layers}")
        return replace(self, layers=self.layers[floor:], first_layer=self.first_layer + floor)
