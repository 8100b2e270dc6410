"""``LayerSelectionCallback``: drives the selection engine from any transformers Trainer.

Use on a plain Trainer::

    from irtuning_plugin import SelectionConfig, attach_layer_selection
    attach_layer_selection(trainer, SelectionConfig(strategy="ir"))
    trainer.train()

With the Trainer at hand the callback scores the gradients before the Trainer clips them (as the
reference does) and adds its figures to the Trainer's own logs; added by hand without the Trainer
(``trainer.add_callback(LayerSelectionCallback(config, model))``) it scores in ``on_pre_optimizer_step``,
i.e. after clipping, and says so in the log.

Every checkpoint gets the engine's state (``irtuning_state.pt``) and the selection log so far; a run
resumed from it (``trainer.train(resume_from_checkpoint=...)``) restores the selection instead of
starting it again, keeps the log rows up to the checkpoint's step and appends the rest, so the log
and ``irtuning_run.json`` cover the whole run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from irtuning_plugin.config import SelectionConfig, check_training_setup
from irtuning_plugin.engine import LayerSelectionEngine

LOG = logging.getLogger(__name__)

SELECTION_LOG = "irtuning_selection.jsonl"
HEATMAP = "irtuning_selection.png"
RUN_SUMMARY = "irtuning_run.json"
STATE_FILE = "irtuning_state.pt"  # in each checkpoint folder


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
        self._label_logits_hook = None
        self._resume_arg: Any = None  # what trainer.train(resume_from_checkpoint=...) was given
        self.resumes: list[dict] = []  # {"step", "checkpoint"} of every resume of this run
        if trainer is not None:
            self._capture_resume_argument(trainer)

    def _capture_resume_argument(self, trainer) -> None:
        """Remember the checkpoint ``trainer.train`` resumes from (the Trainer does not keep it)."""
        original_train = getattr(trainer, "train", None)
        if not callable(original_train):
            return

        def train(resume_from_checkpoint=None, *args, **kwargs):
            self._resume_arg = resume_from_checkpoint
            return original_train(resume_from_checkpoint, *args, **kwargs)

        trainer.train = train

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
        self._install_label_logits(model)
        if self.config.score_gradients == "unclipped" and self.trainer is None and args.max_grad_norm:
            LOG.warning("irtuning: callback added without the Trainer, so scores are of CLIPPED gradients "
                        "(max_grad_norm=%s); use attach_layer_selection(trainer, config) to score unclipped "
                        "ones as the reference does", args.max_grad_norm)
        self._is_main = bool(getattr(state, "is_world_process_zero", True))
        self._check_ddp()
        saved = self._load_checkpoint_state(args, state)
        self.engine.begin(optimizer, train_dataloader, state=saved["engine"] if saved else None)
        if saved:
            self.console_log.warning(
                "irtuning: resumed the selection at step %d from %s; backprop %s; step %d trains layers %s",
                state.global_step, saved["checkpoint"], _backprop_note(self.engine), state.global_step + 1,
                self.engine.active)
        else:
            self.console_log.info(
                "irtuning: strategy %s on %s; backprop %s; step 1 trains layers %s", self.config.strategy,
                self.engine.layer_map.describe(),
                _backprop_note(self.engine), self.engine.active)
        if self._is_main and args.output_dir:
            self._output_dir = Path(args.output_dir)
            self._output_dir.mkdir(parents=True, exist_ok=True)
            if self.config.selection_log:
                self._jsonl = open(self._output_dir / SELECTION_LOG, "w", encoding="utf-8")
                for row in self.rows:  # the history up to the checkpoint, then this run's steps
                    self._jsonl.write(json.dumps(row) + "\n")
                self._jsonl.flush()
        return control

    def _install_label_logits(self, model) -> None:
        if not self.config.label_logits_only:
            return
        if self._label_logits_hook is not None:  # a second train() on this callback
            self._label_logits_hook.remove()
        from irtuning_plugin import label_logits

        target = self.model if self.model is not None else model  # the engine's model (_build_engine)
        self._label_logits_hook = label_logits.install(target)
        self.console_log.info("irtuning: label_logits_only: training forwards project only the positions that "
                              "predict a label token onto the vocabulary")

    # ---- multi-process and checkpoints --------------------------------------------------------
    def _check_ddp(self) -> None:
        """Frozen layers get no gradient, which DDP refuses unless it looks for unused parameters."""
        wrapped = getattr(self.trainer, "model_wrapped", None)
        if not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) or self.config.strategy == "all":
            return
        if not wrapped.find_unused_parameters:
            from irtuning_plugin.engine import SelectionError

            raise SelectionError(
                f"irtuning: irtuning_strategy={self.config.strategy!r} freezes layers, whose parameters then get "
                f"no gradient, and DDP was built with find_unused_parameters=False (it would stop at the next "
                f"step): set ddp_find_unused_parameters: true (TrainingArguments(ddp_find_unused_parameters=True))")

    def _checkpoint_candidates(self, args, state) -> list[Path]:
        out = []
        arg = self._resume_arg
        if isinstance(arg, (str, os.PathLike)):
            out.append(Path(arg))
        elif arg is True and args.output_dir:
            from transformers.trainer_utils import get_last_checkpoint

            last = get_last_checkpoint(args.output_dir)
            if last:
                out.append(Path(last))
        if args.output_dir:
            out.append(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        return out

    def _load_checkpoint_state(self, args, state) -> dict | None:
        """On a resume (global_step > 0 at train start): the selection state saved in the checkpoint."""
        if not state.global_step:
            return None
        for ckpt in self._checkpoint_candidates(args, state):
            path = ckpt / STATE_FILE
            if not path.is_file():
                continue
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if int(saved.get("step", -1)) != int(state.global_step):
                continue
            saved["checkpoint"] = str(ckpt)
            self.resumes = [*saved.get("resumes", []), {"step": int(state.global_step), "checkpoint": str(ckpt)}]
            log = ckpt / SELECTION_LOG
            rows = read_selection_log(log) if log.is_file() else []
            self.rows = [r for r in rows if r["step"] <= state.global_step]
            return saved
        LOG.warning("irtuning: training resumes at step %d but no %s of that step was found (looked in %s): the "
                    "layer selection STARTS AFRESH (scores unmeasured, new random draws) and the selection log "
                    "restarts at this step", state.global_step, STATE_FILE,
                    ", ".join(str(c) for c in self._checkpoint_candidates(args, state)) or "nowhere")
        return None

    def on_save(self, args, state, control, **kwargs):
        if self.engine is None or not self.engine.started or not self._is_main or not args.output_dir:
            return control
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not ckpt.is_dir():
            LOG.warning("irtuning: checkpoint folder %s not found; the selection state is not saved with it "
                        "(a resume from it would restart the selection)", ckpt)
            return control
        payload = {"step": int(state.global_step), "engine": self.engine.state_dict(), "resumes": self.resumes}
        torch.save(payload, ckpt / STATE_FILE)
        with open(ckpt / SELECTION_LOG, "w", encoding="utf-8") as fh:
            for row in self.rows:
                fh.write(json.dumps(row) + "\n")
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
        if self._label_logits_hook is not None:
            self._label_logits_hook.remove()
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
            "resumes": self.resumes,
            "nonfinite_steps": [r["step"] for r in self.rows if r.get("nonfinite_layers")],
            "layers_per_step": counts,
            "losses": [(h["step"], h["loss"]) for h in state.log_history if "loss" in h],
            "label_logits": self._label_logits_hook.counts() if self._label_logits_hook is not None else None,
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
