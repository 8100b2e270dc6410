"""``LayerSelectionCallback``: drives the selection engine from any transformers Trainer.

Use on a plain Trainer::

    from irtuning_plugin import SelectionConfig, attach_layer_selection
    attach_layer_selection(trainer, SelectionConfig(strategy="ir"))
    trainer.train()

With the Trainer at hand the callback scores the gradients before the Trainer clips them (as the
reference does) and adds its figures to the Trainer's own logs; added by hand without the Trainer
(``trainer.add_callback(LayerSelectionCallback(config, model))``) it scores in ``on_pre_optimizer_step``,
i.e. after clipping, and says so in the log.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from irtuning_plugin.config import SelectionConfig, check_training_setup
from irtuning_plugin.engine import LayerSelectionEngine

LOG = logging.getLogger(__name__)

SELECTION_LOG = "irtuning_selection.jsonl"
HEATMAP = "irtuning_selection.png"
RUN_SUMMARY = "irtuning_run.json"


class LayerSelectionCallback(TrainerCallback):
    def __init__(self, config: SelectionConfig, model: Any = None, *, trainer: Any = None,
                 engine: LayerSelectionEngine | None = None, console_log: logging.Logger | None = None):
        self.config = config.check()
        # where the few lines a user must see go (Axolotl's console drops other packages' INFO records)
        self.console_log = console_log or LOG
        self.trainer = trainer
        self.model = model if model is not None else getattr(trainer, "model", None)
        self.engine = engine
        self.rows: list[dict] = []
        self._jsonl = None
        self._is_main = True
        self._output_dir: Path | None = None
        self._patched = False

    # ---- wiring --------------------------------------------------------------------------------
    def _build_engine(self, args, model) -> None:
        if self.engine is not None:
            return
        target = self.model if self.model is not None else model
        if target is None:
            raise ValueError("LayerSelectionCallback needs the model (pass model= or trainer=)")
        seed = self.config.seed if self.config.seed is not None else int(getattr(args, "seed", 0))
        self.engine = LayerSelectionEngine(target, self.config, seed=seed)

    def _patch_trainer(self) -> None:
        """Score before clipping, and put our figures into the Trainer's own log records."""
        trainer = self.trainer
        if trainer is None or self._patched:
            return
        accelerator = getattr(trainer, "accelerator", None)
        if self.config.score_gradients == "unclipped" and accelerator is not None:
            original_clip = accelerator.clip_grad_norm_

            def clip_grad_norm_(parameters, *args, **kwargs):
                unscaled = _unscale_fp16_gradients(accelerator)
                self.engine.collect_scores(step_skipped=_fp16_step_will_be_skipped(accelerator, self.engine))
                if not unscaled:
                    return original_clip(parameters, *args, **kwargs)
                # accelerate's clip_grad_norm_ unscales first, and a second unscale_ in one step raises:
                # the gradients are unscaled already, so let that call pass.
                own = accelerator.__dict__.get("unscale_gradients")
                accelerator.unscale_gradients = lambda optimizer=None: None
                try:
                    return original_clip(parameters, *args, **kwargs)
                finally:
                    if own is None:
                        del accelerator.unscale_gradients
                    else:
                        accelerator.unscale_gradients = own

            accelerator.clip_grad_norm_ = clip_grad_norm_
        original_log = trainer.log

        def log(logs, *args, **kwargs):
            if self.engine is not None and self.engine.started and "loss" in logs:
                logs.update(self.engine.metrics(per_layer=self.config.log_scores))
            return original_log(logs, *args, **kwargs)

        trainer.log = log
        self._patched = True

    # ---- callback events ---------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        trainer = self.trainer  # DeepSpeed/FSDP may also come from accelerate's config, not the arguments
        check_training_setup(
            self.config, torch_compile=getattr(args, "torch_compile", None),
            deepspeed=getattr(args, "deepspeed", None) or getattr(trainer, "is_deepspeed_enabled", False),
            fsdp=getattr(args, "fsdp", None) or getattr(trainer, "is_fsdp_enabled", False))
        self._build_engine(args, model)
        self._patch_trainer()
        if self.config.score_gradients == "unclipped" and self.trainer is None and args.max_grad_norm:
            LOG.warning("irtuning: callback added without the Trainer, so scores are of CLIPPED gradients "
                        "(max_grad_norm=%s); use attach_layer_selection(trainer, config) to score unclipped "
                        "ones as the reference does", args.max_grad_norm)
        self._is_main = bool(getattr(state, "is_world_process_zero", True))
        self.engine.begin(optimizer, train_dataloader)
        self.console_log.info(
            "irtuning: strategy %s on %s; backprop %s; step 1 trains layers %s", self.config.strategy,
            self.engine.layer_map.describe(),
            _backprop_note(self.engine), self.engine.active)
        if self._is_main and args.output_dir:
            self._output_dir = Path(args.output_dir)
            self._output_dir.mkdir(parents=True, exist_ok=True)
            if self.config.selection_log:
                self._jsonl = open(self._output_dir / SELECTION_LOG, "w", encoding="utf-8")
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.engine is not None and not self.engine.scored_this_step:
            # The Trainer's clip_grad_norm_ has run (it always does), so fp16 gradients are unscaled here.
            accelerator = getattr(self.trainer, "accelerator", None)
            self.engine.collect_scores(step_skipped=_fp16_step_will_be_skipped(accelerator, self.engine))
        return control

    def on_step_end(self, args, state, control, train_dataloader=None, **kwargs):
        row = self.engine.end_step(state.global_step, train_dataloader)
        self.rows.append(row)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and not self._patched and self.engine is not None and "loss" in logs:
            logs.update(self.engine.metrics(per_layer=self.config.log_scores))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.engine is not None:
            self.engine.close()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._is_main and self._output_dir is not None:
            self._write_run_summary(state)
            self.engine.strategy.on_train_end(self._output_dir)
        if self._is_main and self._output_dir is not None and self.config.heatmap and self.rows:
            from irtuning_plugin.selection_plot import plot_selection

            try:
                plot_selection(self.rows, self.engine.num_layers, self._output_dir / HEATMAP,
                               title=f"irtuning strategy '{self.config.strategy}'")
            except ImportError as err:  # matplotlib is optional
                LOG.warning("irtuning: no heatmap (%s); pip install matplotlib", err)
        return control

    def _write_run_summary(self, state) -> None:
        counts = [r["n_active"] for r in self.rows]
        summary = {
            "strategy": self.config.strategy,
            "config": {k: v for k, v in vars(self.config).items()},
            "num_layers": self.engine.num_layers,
            "layers_path": self.engine.layer_map.layers_path,
            "backward_cut": self.engine.backward_cut,
            "memory_account_at_end": self.engine.memory_account(),
            "steps": len(self.rows),
            "layers_per_step": counts,
            "losses": [(h["step"], h["loss"]) for h in state.log_history if "loss" in h],
        }
        with open(self._output_dir / RUN_SUMMARY, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=1, default=str)


def _backprop_note(engine: LayerSelectionEngine) -> str:
    if engine.backward_cut:
        return "cut (the input-grad hook is removed; it stops at the lowest trained layer)"
    if engine._input_grad_hooks():
        return "not cut (the input-grad hook stays; it runs down to layer 0)"
    return "stops at the lowest trained layer (no input-grad hook)"


def _fp16_scaler(accelerator: Any):
    scaler = getattr(accelerator, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _unscale_fp16_gradients(accelerator: Any) -> bool:
    """Under fp16 mixed precision, unscale the gradients now (as accelerate's clip_grad_norm_ would do a
    moment later), so scores are of the true gradients, not of gradients times the loss scale.
    True when this call unscaled them."""
    if _fp16_scaler(accelerator) is None:
        return False
    accelerator.unscale_gradients()
    return True


def _fp16_step_will_be_skipped(accelerator: Any, engine: LayerSelectionEngine) -> bool:
    """True when the fp16 loss scaler found inf/NaN gradients while unscaling: it will skip this step."""
    scaler = _fp16_scaler(accelerator)
    if scaler is None or engine.optimizer is None:
        return False
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(engine.optimizer), {})
    return any(float(v.sum()) > 0 for v in state.get("found_inf_per_device", {}).values())


def attach_layer_selection(trainer: Any, config: SelectionConfig | None = None) -> LayerSelectionCallback:
    """Add layer selection to a transformers ``Trainer`` (before ``trainer.train()``)."""
    cb = LayerSelectionCallback(config or SelectionConfig(), trainer=trainer)
    trainer.add_callback(cb)
    return cb


def read_selection_log(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
