"""The 7-70B table of ``benchmarks/RESULTS.md``: every strategy at the paper's setting and at a chat setting, for
the shipped 7-8B architectures and Llama-3.1-70B, predicted by ``irtuning plan``'s counts and models.

    python -m irtuning_plugin.planner.sizes_table [--gpu h100] > table.md
"""

from __future__ import annotations

import argparse
import time

from irtuning_plugin.planner import core
from irtuning_plugin.planner.command import compare_rows, plan_rows
from irtuning_plugin.planner.inputs import Request, read_config

MODELS = ("llama-3.1-8b-instruct", "mistral-7b-instruct-v0.3", "qwen3-8b", "llama-3.1-70b-instruct")
PAPER_LORA = dict(lora_r=32, lora_alpha=64, lora_dropout=0.05,
                  lora_targets=("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"))
SETTINGS = {
    "paper: 16 x 256, no checkpointing": dict(batch=16, seq=256, checkpointing=False),
    "chat: 2 x 4096, checkpointing": dict(batch=2, seq=4096, checkpointing=True),
}
KEEP = ("all LoRA", "ir LoRA (keep)", "ir+floor LoRA (keep)", "salf LoRA", "lisa full (keep)", "lisa full (cpu)",
        "lisa full (drop)", "ir full (keep)", "ir full (cpu)", "ir full (drop)", "full fine-tuning")


def table(gpu: str = "h100", steps: int = 200) -> str:
    lines = ["| model | setting | setup | layers/step min/med/max | peak reserved GiB | fits 24/40/80 GB | "
             f"max micro-batch on 80 GB | bwd FLOPs vs all | cpu-offload GB/step mean/max | {core.GPUS[gpu][0]} "
             "step s: compute / offload each way (mean; model) |", "|" + "---|" * 10]
    for model in MODELS:
        label, cfg = read_config(model)
        for setting, kw in SETTINGS.items():
            req = Request(model_label=label, config=cfg, precision="bf16", attention="sdpa", **PAPER_LORA, **kw)
            specs = [s for s in compare_rows(req, int(cfg["num_hidden_layers"]), steps, ("keep", "cpu", "drop"))
                     if s.label in KEEP]
            for p in plan_rows(specs, gpu, core.MFU):
                lay, t = p.layers, p.step_time
                fits = "/".join("yes" if p.fits[k] else "no" for k in p.fits)
                lines.append(
                    f"| {label} | {setting} | {p.label} | {lay['layers_min']}/{lay['layers_median']:g}/"
                    f"{lay['layers_max']} | {p.peak_reserved_bytes / core.GIB:.1f} | {fits} | "
                    f"{p.max_micro_batch['80GB']} | {p.bwd_flops_ratio_to_all:.2f} | "
                    f"{p.offload_bytes_per_step_mean / 1e9:.2f}/{p.offload_bytes_per_step_max / 1e9:.2f} | "
                    f"{t['compute_s']:.2f} / {t['offload_s_mean']:.2f}"
                    f"{' (hidden)' if t['side_stream_hides_offload'] and t['offload_s_mean'] else ''} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--gpu", default="h100", choices=tuple(core.GPUS))
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    print(table(a.gpu))
    print(f"\n(predicted in {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
