"""The IR-Tuning reference's layer split, transcribed independently of irtuning_plugin (used by the IR fidelity
tests and the Axolotl runs that check the chosen layers against it)."""

import numpy as np


def transcribed_reference_split(norms, layers, metric="gradient"):
    """The reference's split_layer_norms, transcribed from its description (a list-based re-statement,
    independent of our implementation): sort, V over k = 1..n-1, min over the metric's window, then the
    FIRST index of that minimum in the whole list."""
    pairs = sorted(zip(norms, layers))
    rn = [x for x, _ in pairs]
    rl = [y for _, y in pairs]
    var_list = [np.var(np.array(rn[:k])) + np.var(np.array(rn[k:])) for k in range(1, len(rn))]
    q1, q2 = int(len(rn) * 0.35), int(len(rn) * 0.65)
    if metric == "weight":
        q1 += 1
    window = var_list[q1:q2] if metric == "cosine" else var_list[q1:q2 + 1]
    split = var_list.index(min(window))
    if metric == "cosine":
        return rl[:split], rn[:split]
    return rl[split:], rn[split:]


def reference_select(norms, split_num=1, metric="gradient"):
    layers, kept = transcribed_reference_split(norms, list(range(len(norms))), metric)
    if split_num >= 2:
        layers, kept = transcribed_reference_split(kept, layers, metric)
    return sorted(layers)
