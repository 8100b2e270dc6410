"""Which layers a strategy trains at each step on the target depth: simulated with the strategy's own rule, or
replayed from a recorded ``irtuning_selection.jsonl`` mapped to the target's layer count."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from irtuning_plugin.config import PREFIX, SelectionConfig
from irtuning_plugin.strategies import SelectionContext, get_strategy_class

# salf's cut on SmolLM2-135M (30 layers): layers 0..23 frozen, the top 6 train (benchmarks/RESULTS.md). Without
# irtuning_salf_cut the planner keeps that relative depth (it cannot run the calibration on the target).
SALF_SMOLLM2_FLOOR = (24, 30)
SIM_STEPS = 200


class PlanInputError(ValueError):
    """Bad planner input; the message is the one line the user sees."""


@dataclass
class Selection:
    sets: list[list[int]]  # trained layers per step
    source: str  # how the sequence was obtained
    rule_range: tuple[int, int]  # fewest / most layers the strategy's rule can train per step
    fixed_candidates: list[int] = field(default_factory=list)  # every layer that can ever train

    @property
    def counts(self) -> list[int]:
        return [len(s) for s in self.sets]

    def summary(self) -> dict:
        c = self.counts
        return {"layers_min": min(c), "layers_median": statistics.median(c), "layers_max": max(c),
                "lowest_min": min(min(s) for s in self.sets), "lowest_median": statistics.median(min(s) for s in self.sets),
                "rule_range": list(self.rule_range), "source": self.source, "steps": len(self.sets)}


def salf_floor(num_layers: int, cfg: SelectionConfig) -> tuple[int, str]:
    cut = cfg.strategy_options.get("cut") if cfg.strategy == "salf" else None
    if cut is not None:
        return int(cut) + 1, f"{PREFIX}salf_cut={cut}"
    num, den = SALF_SMOLLM2_FLOOR
    floor = min(num_layers - 1, round(num * num_layers / den))
    return floor, (f"salf cut not calibrated on the target (the calibration needs the weights): SmolLM2's cut "
                   f"({num} of {den} layers frozen) at the same relative depth; set {PREFIX}salf_cut to override")


def _ir_bounds(n: int, opts) -> tuple[int, int]:
    """Fewest / most layers one ir split of ``n`` layers trains while the cut stays in the window."""
    lo = int(n * float(opts.window_low)) + (1 if opts.score == "weight" else 0)
    hi = int(n * float(opts.window_high))
    incl = 1 if opts.boundary == "inclusive" else 0
    most, fewest = n - lo - 1 + incl, n - hi - 1 + incl
    return max(1, fewest), max(1, most)


def rule_range(cfg: SelectionConfig, num_layers: int, floor: int) -> tuple[int, int]:
    n = num_layers - floor
    opts = cfg.build_options()
    if cfg.strategy == "ir":
        lo, hi = _ir_bounds(n, opts)
        if int(opts.split_num) >= 2:
            lo, hi = _ir_bounds(lo, opts)[0], _ir_bounds(hi, opts)[1]
        if opts.cut == "reference":
            hi = n  # tied scores put the cut below the window: every layer above the floor can train
        return lo, hi
    if cfg.strategy in ("lisa", "random"):
        k = int(opts.n_layers)
        return k, k
    if cfg.strategy == "ist":
        k = max(1, int(float(opts.train_fraction) * n))
        return k, k
    return n, n


def simulate(cfg: SelectionConfig, num_layers: int, *, steps: int = SIM_STEPS, seed: int = 0) -> Selection:
    """The strategy's rule on ``num_layers`` layers. Gradient scores (``ir``) are drawn uniformly at random
    every step (the real ones depend on data the planner does not see); ``ist`` draws with its initial, equal
    importance; ``salf`` and the ``salf`` floor use the cut described by :func:`salf_floor`."""
    from irtuning_plugin.depth_floor import floored_strategy

    L = num_layers
    name = cfg.strategy
    floor, note = 0, ""
    if name == "salf":
        floor, note = salf_floor(L, cfg)
        layers = list(range(floor, L))
        return Selection([layers], f"salf: layers {floor}..{L - 1} ({note})", (len(layers), len(layers)), layers)
    if cfg.depth_floor == "salf":
        floor, note = salf_floor(L, cfg)
    elif cfg.depth_floor:
        floor = int(cfg.depth_floor)
    if floor >= L:
        raise PlanInputError(f"{PREFIX}depth_floor={floor} leaves no layer to train in a {L}-layer model")
    bounds = rule_range(cfg, L, floor)
    gen = torch.Generator().manual_seed(seed)
    n = L - floor
    if name == "ist":  # its select() runs extra forwards for the importance update: the draw rule alone here
        k = bounds[0]
        sets = [sorted(floor + int(i) for i in torch.randperm(n, generator=gen)[:k].tolist()) for _ in range(steps)]
        src = f"simulated {steps} steps: {k} of layers {floor}..{L - 1} drawn uniformly (ist's initial importance)"
        return Selection(sets, src + (f"; floor: {note}" if note else ""), bounds, list(range(floor, L)))
    cls = get_strategy_class(name)
    strat = floored_strategy(cls, cfg.build_options(), L, floor or None, f"{PREFIX}{name}_")
    scores = torch.full((L,), 1000.0, dtype=torch.float64)
    measured = torch.zeros(L, dtype=torch.bool)
    active = list(range(L))
    sets = []
    for step in range(steps):
        ctx = SelectionContext(step=step, num_layers=L, scores=scores.clone(), ever_measured=measured.clone(),
                               fresh=measured.clone(), active=active, generator=gen)
        active = sorted(int(i) for i in strat.select(ctx))
        sets.append(active)
        # the trained layers get fresh scores; the planner draws them at random
        fresh = torch.rand(L, generator=gen, dtype=torch.float64)
        idx = torch.tensor(active)
        scores[idx] = fresh[idx]
        measured[idx] = True
    how = "gradient scores drawn uniformly at random each step" if name == "ir" else "the strategy's own draws"
    src = f"simulated {steps} steps ({how})" + (f"; floor {floor}: {note}" if note else
                                                 (f"; floor {floor}" if floor else ""))
    return Selection(sets, src, bounds, list(range(floor, L)))


def replay(path: str, cfg: SelectionConfig, num_layers: int) -> Selection:
    """The trained sets of a recorded ``irtuning_selection.jsonl``, each source layer i of L_src standing for
    target layers floor(i L / L_src) .. floor((i + 1) L / L_src) - 1 (the same share of the depth)."""
    p = Path(path)
    if not p.is_file():
        raise PlanInputError(f"--selection {path}: no such file")
    sets, src_layers = [], None
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            active = [int(i) for i in row["active"]]
            width = len(row["scores"])
        except (ValueError, KeyError, TypeError):
            raise PlanInputError(f"--selection {path}: line {n} is not an irtuning_selection.jsonl row "
                                 f"(needs 'active' and 'scores')") from None
        src_layers = width if src_layers is None else src_layers
        mapped = sorted({t for i in active for t in range(i * num_layers // width, (i + 1) * num_layers // width)})
        sets.append(mapped or [min(num_layers - 1, active[0] * num_layers // width)])
    if not sets:
        raise PlanInputError(f"--selection {path}: no rows")
    floor = min(min(s) for s in sets)
    src = f"replayed {len(sets)} steps of {p.name} ({src_layers} layers mapped to {num_layers})"
    counts = [len(s) for s in sets]
    return Selection(sets, src, (min(counts), max(counts)), sorted({i for s in sets for i in s}) or [floor])
