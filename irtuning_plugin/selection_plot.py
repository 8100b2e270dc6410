"""Heatmap of a run's selection: layers x optimizer steps, scores as colour, trained cells outlined."""

from __future__ import annotations

from pathlib import Path


def plot_selection(rows: list[dict], num_layers: int, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = [r["step"] for r in rows]
    active = np.zeros((num_layers, len(rows)))
    scores = np.full((num_layers, len(rows)), np.nan)
    for c, r in enumerate(rows):
        active[r["active"], c] = 1.0
        for i, s in enumerate(r.get("scores", [])):
            if s is not None and s < 1000.0:  # the never-measured sentinel stays blank
                scores[i, c] = s
    width = min(16.0, 4.0 + 0.08 * len(rows))
    fig, (ax1, ax2, ax3) = plt.subplots(
        3, 1, figsize=(width, 2.0 + 0.45 * num_layers), sharex=True,
        gridspec_kw={"height_ratios": [num_layers, num_layers, max(3, num_layers // 3)]},
    )
    ax1.imshow(active, aspect="auto", origin="lower", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax1.set_ylabel("layer")
    ax1.set_title(f"{title}: trained layers (black) per step".strip(": "))
    img = ax2.imshow(scores, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    ax2.set_ylabel("layer")
    ax2.set_title("layer score after the step (stale scores carry over; blank = never measured)")
    fig.colorbar(img, ax=[ax1, ax2], fraction=0.02, pad=0.01)
    ax3.plot(range(len(rows)), active.sum(axis=0), drawstyle="steps-mid")
    ax3.set_ylabel("# trained")
    ax3.set_ylim(0, num_layers + 0.5)
    ax3.set_xlabel("optimizer step")
    n_ticks = min(len(steps), 10)
    idx = [round(k * (len(steps) - 1) / max(1, n_ticks - 1)) for k in range(n_ticks)] if steps else []
    ax3.set_xticks(idx)
    ax3.set_xticklabels([str(steps[k]) for k in idx])
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
