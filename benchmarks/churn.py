"""How many layers enter and leave ``ir``'s trained set per step, and what ``frozen_optimizer_state: cpu``
would move for it at Llama-3.1-8B full fine-tuning. Reads only committed results; trains nothing.

    python -m benchmarks.churn            # prints a markdown table (the RESULTS.md churn section)

* Exact counts where the committed rows hold each step's trained set (the cost runs in
  ``results/costs-smollm2``: 5-8 steps each).
* Lower bounds where they hold only the count and the lowest trained layer per step (the convergence
  cells and the demo-selection cells): with e layers entering, l leaving and dn = e - l, a lower lowest layer
  means one entered (e >= 1) and a higher one means one left (l >= 1), so e + l >= 2 max(a, dn + b, 0) - dn.
* 8B bytes: every entering layer's two fp32 Adam moments come back to the GPU and every leaving layer's go
  to the host, once all layers have trained (before that a new layer has no moments to move): 218.1M
  parameters per Llama-3.1-8B decoder layer x 2 moments x 4 bytes = 1.745 GB per layer moved.
"""

from __future__ import annotations

import glob
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
H, INTER, KV = 4096, 14336, 1024
LLAMA8B_LAYER_PARAMS = 2 * H * H + 2 * H * KV + 3 * H * INTER + 2 * H  # q, o; k, v; gate, up, down; 2 norms
LAYER_MOMENT_BYTES = LLAMA8B_LAYER_PARAMS * 2 * 4


def exact_moves(sets: list[list[int]]) -> list[int]:
    return [len(set(a) ^ set(b)) for a, b in zip(sets, sets[1:])]


def lower_bound_moves(counts: list[int], lowest: list[int]) -> list[int]:
    out = []
    for (n0, lo0), (n1, lo1) in zip(zip(counts, lowest), zip(counts[1:], lowest[1:])):
        dn = n1 - n0
        entered_min = max(int(lo1 < lo0), dn + int(lo1 > lo0), 0)
        out.append(2 * entered_min - dn)
    return out


def _stats(moves: list[int]) -> dict:
    return {"transitions": len(moves), "mean": statistics.mean(moves), "median": statistics.median(moves),
            "max": max(moves), "share_with_moves": sum(1 for m in moves if m) / len(moves)}


def collect() -> list[dict]:
    rows = []
    for f in sorted(glob.glob(str(RESULTS / "costs-smollm2" / "*ir*.json"))):
        d = json.loads(Path(f).read_text())
        sets = [r["active"] for r in d["rows"]]
        rows.append({"source": f"costs-smollm2/{Path(f).stem} ({d['scope']})", "kind": "exact",
                     **_stats(exact_moves(sets)),
                     "lower_bound_mean": statistics.mean(lower_bound_moves([len(s) for s in sets],
                                                                           [min(s) for s in sets]))})
    for grid in ("convergence-cpu-smollm2", "convergence-cpu-smollm2-300steps", "convergence-cpu-smollm2-600steps",
                 "demo-selection", "demo-selection-mb2"):
        groups: dict[str, list[int]] = {}
        for f in sorted(glob.glob(str(RESULTS / grid / "*" / "*.json"))):
            d = json.loads(Path(f).read_text())
            if d["strategy"] not in ("ir", "ir+floor") or "lowest_active" not in d:
                continue
            key = f"{grid}/{Path(f).parent.name} {d['strategy']} ({d['steps']} steps)"
            if d.get("active_per_step"):
                moves = exact_moves(d["active_per_step"])
            else:
                moves = lower_bound_moves(d["layers_per_step"], d["lowest_active"])
            groups.setdefault(key, []).extend(moves)
        for key, moves in groups.items():
            rows.append({"source": key, "kind": "lower bound", **_stats(moves)})
    return rows


def main() -> None:
    print(f"Llama-3.1-8B decoder layer: {LLAMA8B_LAYER_PARAMS / 1e6:.1f}M parameters, "
          f"{LAYER_MOMENT_BYTES / 1e9:.3f} GB of fp32 Adam moments\n")
    print("| selection data | counts | transitions | enter+leave per step: mean | median | max | steps with moves "
          "| 8B full FT GB moved per step: mean | max |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in collect():
        gb = LAYER_MOMENT_BYTES / 1e9
        print(f"| {r['source']} | {r['kind']} | {r['transitions']} | {r['mean']:.2f} | {r['median']:g} | {r['max']} | "
              f"{100 * r['share_with_moves']:.0f}% | {r['mean'] * gb:.1f} | {r['max'] * gb:.1f} |")


if __name__ == "__main__":
    main()
