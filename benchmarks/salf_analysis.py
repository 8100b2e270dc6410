"""Why SALF's maximum-gain rule picks cut 0 on SmolLM2 unless latent space 0 is left out.

    python -m benchmarks.salf_analysis --out benchmarks/results/salf-smollm2.json
    python -m benchmarks.salf_analysis --out benchmarks/results/salf-smollm2.json --report   # table + plot only

Runs the calibration the ``salf`` strategy runs (8 training batches of 4 examples, no gradients) for both
metrics, computes the gains with both estimators with latent space 0 included and excluded, measures
how often the logit lens of latent space 0 ranks the input token itself first, and draws
``benchmarks/salf-smollm2.png`` (deviation curves, gains and the cut of each choice).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from benchmarks.harness import results
from benchmarks.harness.results import BENCHMARKS, RESULTS_MD, replace_section
from benchmarks.harness.training import PadCollator, tokenize_records


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from irtuning_plugin.layer_map import build_layer_map
    from irtuning_plugin.salf_calibration import (
        choose_cut,
        deviation_curve,
        find_final_norm,
        head_is_tied,
        layer_gains,
    )
    from irtuning_plugin.tasks.assets.references import resolve_reference, revision_data_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="irtuning://smollm2-135m-instruct")
    p.add_argument("--out", required=True)
    p.add_argument("--png", default=str(BENCHMARKS / "salf-smollm2.png"))
    p.add_argument("--results-md", default=str(RESULTS_MD), help="'' to leave RESULTS.md alone")
    p.add_argument("--report", action="store_true", help="only rebuild the table and the plot from --out")
    a = p.parse_args(argv)
    if a.report:
        out = json.loads(Path(a.out).read_text())
        plot(out, Path(a.png))
        if a.results_md:
            write_section(out, Path(a.results_md))
        return 0
    model_dir = resolve_reference(a.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    records = [json.loads(x) for x in open(Path(revision_data_dir()) / "train.jsonl") if x.strip()][:64]
    train = tokenize_records(tok, records, 256)
    collate = PadCollator(tok.pad_token_id)
    batches = [collate(train[i * 4:(i + 1) * 4]) for i in range(8)]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    layers = build_layer_map(model, "full").layers
    L = len(layers)
    out: dict = {"model": Path(model_dir).name, "num_layers": L, "tied_head": head_is_tied(model)}
    with torch.no_grad():  # latent space 0 through the head: how often is the top token the input token?
        hits = total = 0
        for b in batches:
            h0 = model.get_input_embeddings()(b["input_ids"])
            top = (find_final_norm(model)(h0) @ model.get_output_embeddings().weight.T).argmax(-1)
            m = b["attention_mask"].bool()
            hits += int((top == b["input_ids"])[m].sum())
            total += int(m.sum())
    out["space0_top1_is_input_token"] = hits / total
    for metric in ("logit_lens", "vocab_semantics"):
        curve = deviation_curve(model, layers, batches, metric=metric)
        d = curve.deviation
        res = {"deviation": d, "tokens": curve.tokens}
        for est in ("raw", "power_law"):
            g_in, fit_in = layer_gains(d, est)
            g_up, fit_up = layer_gains(d[1:], est)
            g_ex = [math.nan] + g_up
            res[est] = {
                "included": {"gains": g_in, "cut": choose_cut(g_in),
                             "fit": None if fit_in is None else [fit_in.a, fit_in.b, fit_in.c]},
                "excluded": {"gains": [None] + g_up, "cut": choose_cut(g_ex, lowest=1),
                             "fit": None if fit_up is None else [fit_up.a, fit_up.b, fit_up.c]},
            }
        out[metric] = res
    Path(a.out).write_text(json.dumps(out, indent=1))
    plot(out, Path(a.png))
    if a.results_md:
        write_section(out, Path(a.results_md))
    for metric in ("logit_lens", "vocab_semantics"):
        for est in ("raw", "power_law"):
            r = out[metric][est]
            print(f"{metric} {est}: cut {r['included']['cut']} with latent space 0, {r['excluded']['cut']} without")
    print("latent space 0: top-1 is the input token for", f"{out['space0_top1_is_input_token']:.1%}", "of tokens")
    return 0


def write_section(out: dict, results_md: Path) -> None:
    replace_section(results_md, "salf", table(out), title="# Counted costs")


def table(out: dict) -> str:
    L = out["num_layers"]
    lines = [f"{out['model']}: {L} layers, tied head: {out['tied_head']}; through the head, latent space 0's top "
             f"token is the input token itself at {out['space0_top1_is_input_token']:.1%} of the positions.", "",
             "| metric | d[0] (embedding) | d[1] | d[L] | estimator | layer 0's gain | largest other gain "
             "| cut with latent space 0 | cut without (layers trained) |", "|---|---|---|---|---|---|---|---|---|"]
    for metric in ("logit_lens", "vocab_semantics"):
        d = out[metric]["deviation"]
        for est in ("raw", "power_law"):
            r = out[metric][est]
            g = r["included"]["gains"]
            cut_ex = r["excluded"]["cut"]
            lines.append(f"| {metric} | {d[0]:.2f} | {d[1]:.2f} | {d[L]:.2f} | {est} | {g[0]:.2f} | "
                         f"{max(g[1:]):.2f} | {r['included']['cut']} | {cut_ex} ({L - 1 - cut_ex}) |")
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    L = out["num_layers"]
    fig, axes = plt.subplots(2, 2, figsize=(15, 8))
    for col, metric in enumerate(("logit_lens", "vocab_semantics")):
        d = out[metric]["deviation"]
        ax = axes[0][col]
        ax.plot(range(L + 1), d, marker="o")
        ax.set_yscale("log")
        ax.set_title(f"{metric}: deviation per latent space (0 = embedding output)")
        ax.set_xlabel("latent space k")
        ax.set_ylabel("mean CE of the trained tokens (log scale)")
        ax = axes[1][col]
        width = 0.4
        for shift, key, colour in ((-width / 2, "included", "tab:gray"), (width / 2, "excluded", "tab:blue")):
            g = np.array([np.nan if v is None else v for v in out[metric]["raw"][key]["gains"]], dtype=float)
            cut = out[metric]["raw"][key]["cut"]
            ax.bar(np.arange(L) + shift, np.nan_to_num(g), width, color=colour,
                   label=f"raw gains, latent space 0 {key}: cut {cut} ({L - 1 - cut} layers train)")
            ax.axvline(cut + 0.5, color=colour, linestyle=":")
        ax.set_yscale("symlog", linthresh=1.0 if metric == "logit_lens" else 0.1)
        ax.set_xlabel("layer l (maps latent space l to l+1)")
        ax.set_ylabel("gain d[l] - d[l+1] (symlog)")
        ax.legend(fontsize=8)
    fig.suptitle(f"SALF calibration on {out['model']} (tied head: {out['tied_head']}; latent space 0's top-1 is the "
                 f"input token for {out['space0_top1_is_input_token']:.0%} of tokens)")
    fig.tight_layout()
    results.save_figure(fig, path, dpi=90)


if __name__ == "__main__":
    sys.exit(main())
