"""``irtuning plan``: the arguments, the rows planned, and the console / JSON / Markdown output."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import yaml

from irtuning_plugin.config import FROZEN_OPTIMIZER_STATES, PREFIX, SelectionConfig, config_from_flat
from irtuning_plugin.planner import core
from irtuning_plugin.planner.count import ATTENTION, CountSetup
from irtuning_plugin.planner.inputs import Request, load_recipe, read_config, shipped_architectures, whole
from irtuning_plugin.planner.selection import SIM_STEPS, PlanInputError, Selection, replay, simulate
from irtuning_plugin.strategies.base import StrategyConfigError

PRECISIONS = ("bf16", "fp16", "fp32", "mixed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Predict what a recipe costs on a GPU: peak device memory (broken down), per-step "
                          "layers/FLOPs/offload traffic of the layer selection, fits on 24/40/80 GB, and a "
                          "step-time model. Counted on the meta device from the model's config.json; terms that are "
                          "modelled are listed in the output.")
    parser.add_argument("recipe", nargs="?", help="an Axolotl or LLaMA-Factory recipe (YAML); optional with --model")
    parser.add_argument("--model", help="config.json, a folder holding one, or a shipped architecture: "
                        + ", ".join(shipped_architectures()))
    parser.add_argument("--batch", help="micro-batch size (overrides the recipe)")
    parser.add_argument("--seq", help="sequence length in tokens (overrides the recipe)")
    parser.add_argument("--scope", choices=("adapter", "full"), help="LoRA (adapter) or full fine-tuning")
    parser.add_argument("--strategy", help="irtuning strategy (default with flags only: none, i.e. plain training)")
    parser.add_argument("--lora-r", help="LoRA rank")
    parser.add_argument("--lora-alpha", help="LoRA alpha")
    parser.add_argument("--lora-targets", help="comma-separated LoRA target modules")
    parser.add_argument("--precision", choices=PRECISIONS, help="weights: bf16/fp16/fp32, or mixed = fp32 weights "
                        "of the trained model with bf16 compute")
    parser.add_argument("--attention", choices=ATTENTION, help="attention implementation")
    parser.add_argument("--lora-dropout", help="LoRA dropout (its mask and dropped input are saved for backward)")
    parser.add_argument("--loss-chunks", help="the loss is computed over this many chunks of the sequence, so its "
                        "fp32 gradient transient is that much smaller (torchtune's chunked loss: 8; default 1)")
    parser.add_argument("--adapter-dtype", choices=("fp32", "weights"),
                        help="LoRA tensors in fp32 (PEFT's default, autocast_adapter_dtype) or in the weights' dtype")
    ck = parser.add_mutually_exclusive_group()
    ck.add_argument("--checkpointing", dest="checkpointing", action="store_true", default=None,
                    help="gradient checkpointing on")
    ck.add_argument("--no-checkpointing", dest="checkpointing", action="store_false", help="gradient checkpointing off")
    parser.add_argument("--frozen-optimizer-state", choices=FROZEN_OPTIMIZER_STATES,
                        help="irtuning_frozen_optimizer_state")
    parser.add_argument("--set", action="append", default=[], metavar="irtuning_KEY=VALUE",
                        help="any irtuning_* key (repeatable), e.g. --set irtuning_depth_floor=8")
    parser.add_argument("--selection", help="replay this irtuning_selection.jsonl instead of simulating")
    parser.add_argument("--steps", default=str(SIM_STEPS), help="simulated steps (default %(default)s)")
    parser.add_argument("--compare", action="store_true",
                        help="also plan all, ir, ist, lisa (full), salf, ir + depth floor, plain LoRA and full FT")
    parser.add_argument("--gpu", choices=tuple(core.GPUS), help="step-time model for this GPU")
    parser.add_argument("--mfu", default=str(core.MFU), help="fraction of peak FLOP/s assumed (default %(default)s)")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON")
    out.add_argument("--markdown", action="store_true", help="print a Markdown table")


def _request(args: argparse.Namespace) -> Request:
    if args.recipe:
        req = load_recipe(args.recipe)
        if args.model:
            req.model_label, req.config = read_config(args.model)
    elif args.model:
        label, cfg = read_config(args.model)
        req = Request(model_label=label, config=cfg)
    else:
        raise PlanInputError("give a recipe (Axolotl or LLaMA-Factory YAML) or --model CONFIG_OR_ARCH")
    if args.batch is not None:
        req.batch = whole(args.batch, "--batch")
    if args.seq is not None:
        req.seq = whole(args.seq, "--seq")
    for name in ("scope", "precision", "attention", "checkpointing", "adapter_dtype"):
        if getattr(args, name) is not None:
            setattr(req, name, getattr(args, name))
    if args.lora_r is not None:
        req.lora_r = whole(args.lora_r, "--lora-r")
        req.lora_alpha = 2 * req.lora_r
    if args.lora_alpha is not None:
        req.lora_alpha = whole(args.lora_alpha, "--lora-alpha")
    if args.lora_dropout is not None:
        try:
            req.lora_dropout = float(args.lora_dropout)
        except ValueError:
            raise PlanInputError(f"--lora-dropout={args.lora_dropout!r}: must be a number in [0, 1)") from None
        if not 0 <= req.lora_dropout < 1:
            raise PlanInputError(f"--lora-dropout={args.lora_dropout!r}: must be a number in [0, 1)")
    if args.loss_chunks is not None:
        req.loss_chunks = whole(args.loss_chunks, "--loss-chunks")
    if args.lora_targets:
        req.lora_targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    flat = {}
    if req.selection is not None:
        flat = {PREFIX + k: v for k, v in dataclasses.asdict(req.selection).items() if k != "strategy_options"}
        flat.update({f"{PREFIX}{req.selection.strategy}_{k}": v for k, v in req.selection.strategy_options.items()})
    if args.strategy:
        flat = {k: v for k, v in flat.items() if not k.startswith(f"{PREFIX}{flat.get(PREFIX + 'strategy')}_")}
        flat[PREFIX + "strategy"] = args.strategy
    if args.frozen_optimizer_state:
        flat[PREFIX + "frozen_optimizer_state"] = args.frozen_optimizer_state
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith(PREFIX):
            raise PlanInputError(f"--set {item!r}: expected irtuning_KEY=VALUE")
        flat[key.strip()] = yaml.safe_load(value)
    if flat:
        flat[PREFIX + "scope"] = req.scope if PREFIX + "scope" not in flat or args.scope else flat[PREFIX + "scope"]
        try:
            req.selection = config_from_flat(flat)
        except StrategyConfigError as exc:
            raise PlanInputError(str(exc).splitlines()[0]) from None
        if req.selection.scope != req.scope:
            raise PlanInputError(f"{PREFIX}scope={req.selection.scope!r} but the recipe trains "
                                 f"{'LoRA adapters' if req.scope == 'adapter' else 'full layers'} (scope "
                                 f"{req.scope!r}): make them agree")
    if req.selection is not None and req.selection.label_logits_only:
        req.notes.append(f"{PREFIX}label_logits_only: counted with logits at every position, an upper bound (the "
                         f"positions that predict a label depend on the data)")
    if req.attention not in ATTENTION:
        raise PlanInputError(f"attention={req.attention!r}; allowed: {', '.join(ATTENTION)}")
    return req


def _count_setup(req: Request, scope: str, train_outside: bool) -> CountSetup:
    return CountSetup(config_json=json.dumps(req.config, sort_keys=True), scope=scope, lora_r=req.lora_r,
                      lora_alpha=req.lora_alpha, lora_dropout=req.lora_dropout, lora_targets=tuple(req.lora_targets),
                      weight_dtype="bf16" if req.precision == "mixed" else req.precision, attention=req.attention,
                      train_outside=train_outside, adapter_dtype=req.adapter_dtype)


def _selection_config(name: str, scope: str, base: SelectionConfig | None) -> SelectionConfig:
    flat = {PREFIX + "strategy": name, PREFIX + "scope": scope}
    if base is not None:
        flat[PREFIX + "frozen_optimizer_state"] = base.frozen_optimizer_state
        if base.strategy == name:
            flat.update({f"{PREFIX}{name}_{k}": v for k, v in base.strategy_options.items()})
            if base.depth_floor is not None:
                flat[PREFIX + "depth_floor"] = base.depth_floor
    return config_from_flat(flat)


def _row(req: Request, label: str, scope: str, sel_cfg: SelectionConfig | None, selection: Selection,
         fos: str) -> core.RowSpec:
    lisa_outside = not (sel_cfg is not None and sel_cfg.strategy == "lisa"
                        and not sel_cfg.build_options().train_outside)
    train_outside = scope == "full" and lisa_outside
    precision = req.precision if not (req.precision == "mixed" and scope == "adapter") else "bf16"
    return core.RowSpec(label=label, count=_count_setup(req, scope, train_outside), selection=selection,
                        batch=req.batch, seq=req.seq, num_layers=int(req.config["num_hidden_layers"]),
                        checkpointing=req.checkpointing, frozen_optimizer_state=fos, precision=precision,
                        loss_chunks=req.loss_chunks, notes=list(req.notes))


def _all_layers(L: int, why: str) -> Selection:
    return Selection([list(range(L))], why, (L, L), list(range(L)))


def build_rows(req: Request, args: argparse.Namespace) -> list[core.RowSpec]:
    L = int(req.config["num_hidden_layers"])
    steps = whole(args.steps, "--steps")
    kind = "LoRA" if req.scope == "adapter" else "full"


    rows = []
    if req.selection is None:
        rows.append(_row(req, f"recipe: plain {kind}", req.scope, None,
                         _all_layers(L, "no layer selection: every layer trains"), "keep"))
    else:
        s = req.selection
        floor = f"+floor {s.depth_floor}" if s.depth_floor not in (None, 0) else ""
        label = f"recipe: {s.strategy}{floor} {kind}" + (f" ({s.frozen_optimizer_state})" if s.strategy != "all" else "")
        sel = replay(args.selection, s, L) if args.selection else simulate(s, L, steps=steps)
        rows.append(_row(req, label, req.scope, s, sel, s.frozen_optimizer_state))
    if args.compare:
        rows.extend(compare_rows(req, L, steps))
    return rows


def compare_rows(req: Request, L: int, steps: int, fos_list: tuple[str, ...] | None = None) -> list[core.RowSpec]:
    """all / ir / ist / salf / ir + depth floor in the recipe's scope, lisa and ir in full fine-tuning (each with
    the recipe's frozen_optimizer_state, or each of ``fos_list``), plain LoRA and full fine-tuning."""
    base = req.selection
    fos_all = fos_list or ((base.frozen_optimizer_state if base is not None else "keep"),)
    rows = []
    for name in ("all", "ir", "ist", "salf", "ir+floor", "lisa full", "ir full"):
        strategy = name.split()[0]
        scope = "full" if name.endswith(" full") else req.scope
        k = "LoRA" if scope == "adapter" else "full"
        if name == "ir full" and req.scope == "full":
            continue  # the recipe's own scope already gives ir in full fine-tuning
        cfg = _selection_config("ir" if strategy == "ir+floor" else strategy, scope, base)
        if strategy == "ir+floor":
            cfg = dataclasses.replace(cfg, depth_floor="salf")
        sel = simulate(cfg, L, steps=steps)
        for fos in (fos_all if strategy not in ("all", "salf") else ("keep",)):
            tag = f" ({fos})" if strategy not in ("all", "salf") else ""
            rows.append(_row(req, f"{strategy} {k}{tag}", scope, cfg, sel, fos))
    rows.append(_row(req, "plain LoRA", "adapter", None, _all_layers(L, "every layer trains"), "keep"))
    rows.append(_row(req, "full fine-tuning", "full", None, _all_layers(L, "every layer trains"), "keep"))
    return rows


def plan_rows(specs: list[core.RowSpec], gpu: str | None, mfu: float) -> list[core.RowPlan]:
    planner = core.Planner()
    out = []
    for spec in specs:
        ref = dataclasses.replace(spec, selection=_all_layers(spec.num_layers, "all"))
        all_bwd = planner.plan(ref, None, None, mfu).bwd_flops if spec.selection.sets != ref.selection.sets else None
        p = planner.plan(spec, gpu, all_bwd, mfu)
        if all_bwd is None:
            p.bwd_flops_ratio_to_all = 1.0
        out.append(p)
    return out


MODELLED = [
    "counted (meta device): parameter, gradient and AdamW-moment bytes of what trains; bytes saved for backward; FLOPs",
    "modelled: the loss transient (fp32 logits' gradient + its copy) at micro-batch x seq x vocab",
    "modelled: attention kernel saved tensors for sdpa/flash (q, k, v, out, fp32 log-sum-exp, as flash-attention 2)",
    "modelled: checkpointing keeps each layer's input and rebuilds one layer at a time",
    "modelled: cpu offload holds the moments of two consecutive trained sets on the device (the copies overlap "
    "the next forward/backward)",
    f"modelled: foreach AdamW step temporary = stepped moments; allocator overhead {core.ALLOCATOR_OVERHEAD:.0%} of "
    f"the peak (reserved); CUDA context {core.CUDA_CONTEXT_GIB} GiB outside the allocator (in 'fits'); cuBLAS "
    f"workspace not counted",
]


def _gib(b: float) -> str:
    return f"{b / core.GIB:.2f}"


def _row_cells(p: core.RowPlan) -> list[str]:
    lay = p.layers
    fits = "/".join("y" if p.fits[k] else "n" for k in p.fits)
    mb = "/".join(str(p.max_micro_batch[k]) for k in p.max_micro_batch)
    ratio = "" if p.bwd_flops_ratio_to_all is None else f"{p.bwd_flops_ratio_to_all:.2f}"
    cells = [p.label, f"{lay['layers_min']}/{lay['layers_median']:g}/{lay['layers_max']}",
             f"{lay['rule_range'][0]}-{lay['rule_range'][1]}", str(lay["lowest_min"]),
             _gib(p.frozen_weight_bytes), _gib(p.trainable_weight_bytes), _gib(p.grad_bytes),
             _gib(p.optimizer_device_bytes) + (f" (+{_gib(p.optimizer_host_bytes)} host)" if p.optimizer_host_bytes else ""),
             _gib(p.activation_bytes), _gib(p.transient_bytes), _gib(p.peak_allocated_bytes),
             _gib(p.peak_reserved_bytes), fits, mb, ratio,
             f"{p.offload_bytes_per_step_mean / 1e9:.2f}/{p.offload_bytes_per_step_max / 1e9:.2f}"]
    if p.step_time:
        t = p.step_time
        hidden = " hidden" if t["side_stream_hides_offload"] and t["offload_s_mean"] else ""
        cells.append(f"{t['compute_s']:.2f} / {t['offload_s_mean']:.2f}{hidden}")
    return cells


HEADERS = ["setup", "layers min/med/max", "rule", "lowest", "frozen W", "train W", "grads", "optim",
           "activations", "transient", "peak alloc", "reserved", "fits 24/40/80", "max mb 24/40/80",
           "bwd FLOPs vs all", "offload GB/step mean/max"]


def render(req: Request, plans: list[core.RowPlan], gpu: str | None, fmt: str) -> str:
    headers = HEADERS + (["step s: compute / offload (mean)"] if gpu else [])
    rows = [_row_cells(p) for p in plans]
    head = (f"{req.model_label} ({req.config['num_hidden_layers']} layers) | {req.source} | micro-batch {req.batch} x "
            f"seq {req.seq} | {req.precision} | attention {req.attention} | checkpointing "
            f"{'on' if req.checkpointing else 'off'} | " + (f"LoRA r{req.lora_r} ({req.adapter_dtype}) on "
                                                             f"{','.join(req.lora_targets)}" if req.scope == "adapter"
                                                             else "full fine-tuning") +
            (f" (compare rows: LoRA r{req.lora_r} on {','.join(req.lora_targets)})"
             if req.scope == "full" else ""))
    notes = list(MODELLED)
    for p in plans:
        notes.append(f"{p.label}: layers {p.strategy_source}; peak in {p.peak_phase}")
        notes.extend(f"{p.label}: {n}" for n in p.notes)
    if gpu:
        notes.append("step time is a MODEL, not a measurement: " + plans[0].step_time["model"])
    if fmt == "markdown":
        lines = [f"**{head}** (GiB; predicted)", "", "| " + " | ".join(headers) + " |",
                 "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines += [""] + [f"- {n}" for n in notes]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt_row = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    lines = [head, "memory in GiB (predicted); fits on 24/40/80 GB cards (y/n) and the largest micro-batch that fits", "",
             fmt_row(headers), fmt_row(["-" * w for w in widths])]
    lines += [fmt_row(r) for r in rows]
    lines += [""] + [f"* {n}" for n in notes]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> str:
    req = _request(args)
    try:
        mfu = float(args.mfu)
    except ValueError:
        raise PlanInputError(f"--mfu={args.mfu!r}: must be a number in (0, 1]") from None
    if not 0 < mfu <= 1:
        raise PlanInputError(f"--mfu={args.mfu!r}: must be a number in (0, 1]")
    plans = plan_rows(build_rows(req, args), args.gpu, mfu)
    if args.json:
        return json.dumps({"model": req.model_label, "source": req.source, "batch": req.batch, "seq": req.seq,
                           "precision": req.precision, "attention": req.attention,
                           "checkpointing": req.checkpointing, "lora_r": req.lora_r,
                           "lora_targets": list(req.lora_targets), "num_layers": req.config["num_hidden_layers"],
                           "modelled": MODELLED, "rows": [p.to_json() for p in plans]}, indent=1)
    return render(req, plans, args.gpu, "markdown" if args.markdown else "text")


def main(args: argparse.Namespace) -> int:
    try:
        text = run(args)
    except (PlanInputError, StrategyConfigError) as exc:
        print(f"irtuning plan: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback (the issue's rule for this command)
        print(f"irtuning plan: failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
              file=sys.stderr)
        return 1
    print(text)
    return 0
