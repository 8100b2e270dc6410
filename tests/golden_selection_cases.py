"""Seeded selection runs whose per-step choices are frozen in tests/golden/selection/<case>.json.

Each case is a short plain-Trainer run (tiny Llama, 8 optimizer steps) configured through flat
``irtuning_*`` keys, the way Axolotl and the CLI pass them. ``run_case`` returns the rows of the
selection log the callback wrote, reduced to what must not change when the code is reorganised:
the step, the layers trained and chosen next, the strategy's own logged fields. Timings are left out,
and every float is replaced by the marker ``"float"`` (the structure — which keys, how many values —
is kept, the value is not: a last-digit change in a score is not a change of selection).

A resume case trains with a checkpoint every 4 steps, stops after step 4 (as a killed run would),
then resumes from checkpoint-4 to step 8 in the same folder; its rows are the final log (steps 1..8),
which must equal the rows of its ``base`` case (the same run, uninterrupted).

tests/golden/make_golden.py writes the golden files; tests/test_golden_selection.py compares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from helpers_tiny import make_trainer, tiny_peft_llama

STEPS = 8
STOP_AT = 4  # the resume cases' interrupted run stops (and checkpoints) here
TIMING = ("score_ms", "select_ms", "salf_calibration_s")
FLOAT = "float"

IST_UPDATES = {"irtuning_ist_first_update": 2, "irtuning_ist_update_every": 2, "irtuning_ist_estimation_batch": 4}
LISA_MOVING = {"irtuning_lisa_n_layers": 3, "irtuning_lisa_interval": 2}

# name -> {"flat": irtuning_* keys, "model": "peft" | "full", "max_grad_norm": float, "base": uninterrupted case}
CASES: dict[str, dict[str, Any]] = {
    # every registered strategy at its default options, adapter scope
    "all": {"flat": {"irtuning_strategy": "all"}},
    "fixed": {"flat": {"irtuning_strategy": "fixed", "irtuning_fixed_layers": [1, 4]}},
    "ir": {"flat": {"irtuning_strategy": "ir"}},
    "ist": {"flat": {"irtuning_strategy": "ist"}},
    "lisa": {"flat": {"irtuning_strategy": "lisa"}},
    "random": {"flat": {"irtuning_strategy": "random"}},
    "salf": {"flat": {"irtuning_strategy": "salf"}},
    # options that change what a strategy does
    "ir_clip": {"flat": {"irtuning_strategy": "ir"}, "max_grad_norm": 0.1},  # clips most steps here
    "ir_clipped_scores": {"flat": {"irtuning_strategy": "ir", "irtuning_score_gradients": "clipped"},
                          "max_grad_norm": 0.05},
    "ir_cosine": {"flat": {"irtuning_strategy": "ir", "irtuning_ir_score": "cosine"}},
    "ir_weight": {"flat": {"irtuning_strategy": "ir", "irtuning_ir_score": "weight"}},
    "ir_split2": {"flat": {"irtuning_strategy": "ir", "irtuning_ir_split_num": 2}},
    "ist_updates": {"flat": {"irtuning_strategy": "ist", **IST_UPDATES}, "max_grad_norm": 1.0},
    "lisa_moving": {"flat": {"irtuning_strategy": "lisa", **LISA_MOVING}, "max_grad_norm": 1.0},
    "salf_clip": {"flat": {"irtuning_strategy": "salf", "irtuning_salf_calibration_batches": 2},
                  "max_grad_norm": 1.0},
    # the depth floor
    "floor2_ir": {"flat": {"irtuning_strategy": "ir", "irtuning_depth_floor": 2}},
    "floor2_lisa": {"flat": {"irtuning_strategy": "lisa", "irtuning_depth_floor": 2, **LISA_MOVING}},
    "floor2_random": {"flat": {"irtuning_strategy": "random", "irtuning_depth_floor": 2,
                               "irtuning_random_n_layers": 2}},
    "floor2_ist": {"flat": {"irtuning_strategy": "ist", "irtuning_depth_floor": 2, **IST_UPDATES}},
    "floor_salf_ir": {"flat": {"irtuning_strategy": "ir", "irtuning_depth_floor": "salf"}},
    # full fine-tuning of whole layers, frozen layers' Adam moments moved to the host
    "full_ir_cpu": {"flat": {"irtuning_strategy": "ir", "irtuning_scope": "full",
                             "irtuning_frozen_optimizer_state": "cpu"}, "model": "full", "max_grad_norm": 1.0},
    "full_lisa_cpu": {"flat": {"irtuning_strategy": "lisa", "irtuning_scope": "full",
                               "irtuning_frozen_optimizer_state": "cpu", **LISA_MOVING}, "model": "full"},
    # interrupted after step 4, resumed from checkpoint-4: the same rows as the uninterrupted base case
    "resume_ir": {"base": "ir_clip"},
    "resume_ist": {"base": "ist_updates"},
    "resume_lisa": {"base": "lisa_moving"},
    "resume_salf": {"base": "salf_clip"},
}


def case_settings(name: str) -> dict[str, Any]:
    case = CASES[name]
    if "base" in case:
        return {**case_settings(case["base"]), "base": case["base"]}
    return {"model": "peft", "max_grad_norm": 0.0, **case}


def tiny_full_llama(num_layers: int = 6, hidden: int = 32, vocab: int = 128, seed: int = 0):
    """The same tiny Llama as helpers_tiny.tiny_peft_llama, without LoRA (for irtuning_scope: full)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


class _StopAfter(TrainerCallback):
    """Ends training after optimizer step ``step`` (the checkpoint of that step is still written)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def _train(settings: dict[str, Any], out: Path, *, save: bool = False, stop_after: int | None = None,
           resume: str | None = None) -> None:
    from irtuning_plugin.callback import attach_layer_selection
    from irtuning_plugin.config import config_from_flat

    model = tiny_full_llama() if settings["model"] == "full" else tiny_peft_llama()
    kw = {"save_strategy": "steps", "save_steps": STOP_AT} if save else {}
    trainer = make_trainer(model, out, max_steps=STEPS, max_grad_norm=settings["max_grad_norm"], **kw)
    config = config_from_flat({"irtuning_heatmap": False, **settings["flat"]})
    attach_layer_selection(trainer, config)
    if stop_after is not None:
        trainer.add_callback(_StopAfter(stop_after))
    trainer.train(resume_from_checkpoint=resume)


def robust(value: Any) -> Any:
    """``value`` with every float replaced by the marker ``"float"`` (ints, strings, bools kept)."""
    if isinstance(value, float):
        return FLOAT
    if isinstance(value, list):
        return [robust(v) for v in value]
    if isinstance(value, dict):
        return {k: robust(v) for k, v in value.items()}
    return value


def reduce_rows(rows: list[dict]) -> list[dict]:
    return [{k: robust(v) for k, v in row.items() if k not in TIMING} for row in rows]


def run_case(name: str, tmp_dir: str | Path) -> list[dict]:
    """Train case ``name`` under ``tmp_dir``; the reduced rows of its selection log, one per optimizer step."""
    from irtuning_plugin.callback import SELECTION_LOG, read_selection_log

    settings = case_settings(name)
    out = Path(tmp_dir) / name
    if "base" in settings:
        _train(settings, out, save=True, stop_after=STOP_AT)
        first = read_selection_log(out / SELECTION_LOG)
        if [r["step"] for r in first] != list(range(1, STOP_AT + 1)):
            raise AssertionError(f"{name}: the interrupted run logged steps {[r['step'] for r in first]}")
        _train(settings, out, save=True, resume=str(out / f"checkpoint-{STOP_AT}"))
    else:
        _train(settings, out)
    return reduce_rows(read_selection_log(out / SELECTION_LOG))
