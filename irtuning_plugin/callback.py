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
from typing import Any, Callable

import torch
from transformers import TrainerCallback

from irtuning_plugin import preflight
from irtuning_plugin.config import SelectionConfig
from irtuning_plugin.engine import STATE_ADVICE, LayerSelectionEngine, SelectionError
from irtuning_plugin.trainer_patches import TrainerPatches, fp16_step_will_be_skipped

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
        self.trainer = None
        self.model = model if model is not None else getattr(trainer, "model", None)
        self.engine = engine
        self.rows: list[dict] = []
        self._jsonl = None
        self._is_main = True
        self._output_dir: Path | None = None
        self._patches: TrainerPatches | None = None  # what we change on the Trainer (trainer_patches.py)
        self._label_logits_hook = None
        self._resume_arg: Any = None  # what trainer.train(resume_from_checkpoint=...) was given
        self.resumes: list[dict] = []  # {"step", "checkpoint"} of every resume of this run (+ "config_changed")
        self.not_written: list[dict] = []  # {"file", "error"} of each of our files a write failed for
        self._resume_note: dict | None = None  # settings changed on this resume: noted in the next log row
        self._log_failed = False  # the per-step log write failed: no more writes until train end
        self._filled_for_save: list = []  # FSDP2: parameters given AdamW's initial state for the next save
        if trainer is not None:
            self.bind_trainer(trainer)

    def bind_trainer(self, trainer) -> None:
        """Use ``trainer``: wrap its ``train`` now (to learn the checkpoint each call resumes from, which the
        Trainer does not keep); the patches for scoring and logging follow when training starts."""
        self.trainer = trainer
        config = self.config

        def attached() -> bool:
            handler = getattr(trainer, "callback_handler", None)
            return handler is None or self in handler.callbacks

        def on_train_call(resume_from_checkpoint) -> None:
            self._resume_arg = resume_from_checkpoint

        self._patches = TrainerPatches(trainer, attached=attached, on_train_call=on_train_call,
                                       engine=lambda: self.engine, per_layer=config.log_scores,
                                       score_unclipped=config.score_gradients == "unclipped")
        self._patches.arm()

    # ---- wiring --------------------------------------------------------------------------------
    def _build_engine(self, args, model) -> None:
        if self.engine is not None:
            return
        target = self.model if self.model is not None else model
        if target is None:
            raise ValueError("LayerSelectionCallback needs the model (pass model= or trainer=)")
        seed = self.config.seed if self.config.seed is not None else int(getattr(args, "seed", 0))
        self.engine = LayerSelectionEngine(target, self.config, seed=seed)

    # ---- callback events ---------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        self._check_setup(args)
        self._build_engine(args, model)
        if self._patches is not None:  # undone in on_train_end, or by trainer.train when training raises
            self._patches.start_training()
        self._install_label_logits(model)
        if self.config.score_gradients == "unclipped" and self.trainer is None and args.max_grad_norm:
            LOG.warning("irtuning: callback added without the Trainer, so scores are of CLIPPED gradients "
                        "(max_grad_norm=%s); use attach_layer_selection(trainer, config) to score unclipped "
                        "ones as the reference does", args.max_grad_norm)
        self._is_main = bool(getattr(state, "is_world_process_zero", True))
        if self.engine.sharded:  # the initial states a checkpoint's save filled in (see _fill_for_save)
            self.engine.drop_initial_optimizer_state(optimizer=optimizer)
        saved = self._load_checkpoint_state(args, state)
        self.engine.begin(optimizer, train_dataloader, state=saved["engine"] if saved else None,
                          state_source=saved["file"] if saved else None)
        if saved and self.engine.config_changes:
            self.resumes[-1]["config_changed"] = self.engine.config_changes
            self._resume_note = self.engine.config_changes
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
            if self.config.selection_log:
                self._open_selection_log()
        return control

    # ---- our files: every write is guarded, so a failure never costs the user their training or model ----
    def _guard(self, path: Path | str, write: Callable[[], Any], step: int | None = None,
               then: str = "training and the framework's own saving go on without it") -> bool:
        """Run ``write``; on any error say so in one loud line naming the file, record it for the run
        summary (``not_written``) and go on. True when it was written."""
        try:
            write()
            return True
        except Exception as err:  # noqa: BLE001 - any failure of ours must not end the user's run
            text = " ".join(f"{type(err).__name__}: {err}".split())
            LOG.error("irtuning: could not write %s (%s); %s", path, text, then)
            entry = {"file": str(path), "error": text}
            if step is not None:
                entry["step"] = int(step)
            self.not_written.append(entry)
            return False

    def _open_selection_log(self) -> None:
        path = self._output_dir / SELECTION_LOG

        def write() -> None:
            self._output_dir.mkdir(parents=True, exist_ok=True)
            fh = open(path, "w", encoding="utf-8")
            try:
                for row in self.rows:  # the history up to the checkpoint, then this run's steps
                    fh.write(json.dumps(row) + "\n")
                fh.flush()
            except BaseException:
                _close_quietly(fh)
                raise
            self._jsonl = fh

        self._log_failed = not self._guard(path, write)

    def _append_log_row(self, row: dict) -> None:
        """One row per step. After a failed write (a full disk) the file is not written again in this run:
        the rows stay in memory (and go into each checkpoint's copy) and the whole log is written once
        more at train end."""
        def write() -> None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()

        if not self._guard(self._output_dir / SELECTION_LOG, write, step=row["step"],
                           then="training goes on; the log is not written again until train end, when it is "
                                "rewritten in full from memory"):
            _close_quietly(self._jsonl)
            self._jsonl = None
            self._log_failed = True

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
    def _check_setup(self, args) -> None:
        """The preflight refusals, from the Trainer's arguments and what accelerate and DDP were built with."""
        trainer = self.trainer  # DeepSpeed/FSDP may also come from accelerate's config, not the arguments
        fsdp = getattr(args, "fsdp", None) or getattr(trainer, "is_fsdp_enabled", False)
        # accelerate's FSDP plugin knows the version in use (transformers 5 defaults to 2, accelerate to 1)
        fsdp_plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "fsdp_plugin", None)
        wrapped = getattr(trainer, "model_wrapped", None)
        ddp = isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
        preflight.check(preflight.TrainingSetup(
            preflight.TRAINER, self.config.strategy, self.config.scope, torch_compile=getattr(args, "torch_compile", None),
            deepspeed=getattr(args, "deepspeed", None) or getattr(trainer, "is_deepspeed_enabled", False),
            fsdp=fsdp, fsdp_config=getattr(args, "fsdp_config", None) if fsdp else None,
            fsdp_version=getattr(fsdp_plugin, "fsdp_version", None) if fsdp else None,
            ddp_find_unused_parameters=bool(wrapped.find_unused_parameters) if ddp else None))

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
            saved = read_state_file(path)
            if saved["step"] != int(state.global_step):
                continue
            saved["checkpoint"], saved["file"] = str(ckpt), str(path)
            self.resumes = [*saved.get("resumes", []), {"step": int(state.global_step), "checkpoint": str(ckpt)}]
            log = ckpt / SELECTION_LOG
            if log.is_file():
                try:
                    rows = read_selection_log(log)
                except SelectionError as err:
                    raise SelectionError(f"{err}: remove it to resume with the log's rows up to step "
                                         f"{state.global_step} left out, or resume from another checkpoint") from None
            else:
                rows = []
                LOG.warning("irtuning: %s has no %s: the selection log of this run starts at step %d (the selection "
                            "itself is restored)", ckpt, SELECTION_LOG, state.global_step + 1)
            self.rows = [r for r in rows if r["step"] <= state.global_step]
            return saved
        LOG.warning("irtuning: training resumes at step %d but no %s of that step was found (looked in %s): the "
                    "layer selection STARTS AFRESH (scores unmeasured, new random draws) and the selection log "
                    "restarts at this step", state.global_step, STATE_FILE,
                    ", ".join(str(c) for c in self._checkpoint_candidates(args, state)) or "nowhere")
        return None

    def _fill_for_save(self, step: int) -> None:
        """FSDP2: accelerate saves and loads the optimizer with torch.distributed.checkpoint, whose load
        wants every parameter's state; a layer that never trained (or whose state ``drop`` deleted) has none.
        Give those AdamW's initial state (which steps exactly as none) for the save; on_save deletes it."""
        self._filled_for_save = self.engine.fill_initial_optimizer_state()
        missing = {id(p) for p in self.engine.stateless_optimizer_params()}
        if missing:  # not Adam/AdamW: the initial state is not known
            layers = [i for i, ps in enumerate(self.engine.layer_map.params) if any(id(p) in missing for p in ps)]
            LOG.warning("irtuning: the checkpoint of step %d cannot be resumed under FSDP2: %d parameters (layers "
                        "%s) have no optimizer state and %s is not Adam/AdamW, whose initial state irtuning fills "
                        "in for the save; use AdamW, or irtuning_strategy: all", step, len(missing), layers,
                        type(self.engine.optimizer).__name__)

    def _drop_filled(self) -> None:
        if self._filled_for_save:
            self.engine.drop_initial_optimizer_state(self._filled_for_save)
            self._filled_for_save = []

    def on_save(self, args, state, control, **kwargs):
        self._drop_filled()  # every rank, before anything else
        if self.engine is None or not self.engine.started or not self._is_main or not args.output_dir:
            return control
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not ckpt.is_dir():
            LOG.warning("irtuning: checkpoint folder %s not found; the selection state is not saved with it "
                        "(a resume from it would restart the selection)", ckpt)
            return control
        payload = {"step": int(state.global_step), "engine": self.engine.state_dict(), "resumes": self.resumes}
        step = int(state.global_step)
        self._guard(ckpt / STATE_FILE, lambda: _replace_atomically(ckpt / STATE_FILE, lambda p: torch.save(payload, p)),
                    step=step)
        self._guard(ckpt / SELECTION_LOG, lambda: _replace_atomically(ckpt / SELECTION_LOG,
                                                                      lambda p: _write_rows(p, self.rows)), step=step)
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.engine is not None and not self.engine.scored_this_step:
            # The Trainer's clip_grad_norm_ has run (it always does), so fp16 gradients are unscaled here.
            accelerator = getattr(self.trainer, "accelerator", None)
            self.engine.collect_scores(step_skipped=fp16_step_will_be_skipped(accelerator, self.engine))
        return control

    def on_step_end(self, args, state, control, train_dataloader=None, **kwargs):
        row = self.engine.end_step(state.global_step, train_dataloader)
        if self._resume_note is not None:  # the first step after a resume with changed settings
            row["resume_config_changed"] = self._resume_note
            self._resume_note = None
        self.rows.append(row)
        if self._jsonl is not None:
            self._append_log_row(row)
        if self.engine.sharded:
            self._drop_filled()  # a save that did not happen after all: its states go (any that stepped stay)
            if control.should_save:  # set by the Trainer's flow callback, which runs before this one
                self._fill_for_save(state.global_step)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs_patched = self._patches is not None and self._patches.logs_patched
        if logs is not None and not logs_patched and self.engine is not None and "loss" in logs:
            logs.update(self.engine.metrics(per_layer=self.config.log_scores))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._patches is not None:
            self._patches.end_training()
        if self.engine is not None:
            self._drop_filled()
            self.engine.close()
        if self._label_logits_hook is not None:
            self._label_logits_hook.remove()
        if self._jsonl is not None:
            fh, self._jsonl = self._jsonl, None
            if not self._guard(self._output_dir / SELECTION_LOG, fh.close):
                _close_quietly(fh)
                self._log_failed = True
        if not (self._is_main and self._output_dir is not None):
            return control
        out = self._output_dir
        if self._log_failed:
            log = out / SELECTION_LOG
            if self._guard(log, lambda: _write_rows(log, self.rows)):
                self.not_written = [e for e in self.not_written if e["file"] != str(log)]
                LOG.warning("irtuning: wrote %s in full at train end (%d rows) after its failed write", log,
                            len(self.rows))
        if self.engine is not None:
            self._strategy_files(out)
        if self.config.heatmap and self.rows:
            self._guard(out / HEATMAP, self._plot_heatmap)
        if self.engine is not None:
            self._guard(out / RUN_SUMMARY, lambda: self._write_run_summary(state))
        return control

    def _strategy_files(self, out: Path) -> None:
        """The strategy's own train-end files (salf's calibration plot), guarded like ours."""
        try:
            self.engine.strategy.on_train_end(out)
        except Exception as err:  # noqa: BLE001 - a plot must not cost the user their model
            where = getattr(err, "filename", None) or f"{out} (the train-end files of strategy {self.config.strategy!r})"
            self._guard(where, lambda e=err: _reraise(e))

    def _plot_heatmap(self) -> None:
        from irtuning_plugin.selection_plot import plot_selection

        try:
            plot_selection(self.rows, self.engine.num_layers, self._output_dir / HEATMAP,
                           title=f"irtuning strategy '{self.config.strategy}'")
        except ImportError as err:  # matplotlib is optional
            raise ImportError(f"{err}; pip install matplotlib") from None

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
            "not_written": self.not_written,  # our files a write failed for (logged when it happened)
            **self.engine.run_facts(),  # kernel self-check and kernel_fallback; cpu offload byte totals
        }
        text = json.dumps(summary, indent=1, default=str)
        _replace_atomically(self._output_dir / RUN_SUMMARY, lambda p: p.write_text(text, encoding="utf-8"))


def _backprop_note(engine: LayerSelectionEngine) -> str:
    if engine.backward_cut:
        return "cut (the input-grad hook is removed; it stops at the lowest trained layer)"
    if engine._input_grad_hooks():
        return "not cut (the input-grad hook stays; it runs down to layer 0)"
    return "stops at the lowest trained layer (no input-grad hook)"


def attach_layer_selection(trainer: Any, config: SelectionConfig | None = None) -> LayerSelectionCallback:
    """Add layer selection to a transformers ``Trainer`` (before ``trainer.train()``)."""
    cb = LayerSelectionCallback(config or SelectionConfig(), trainer=trainer)
    trainer.add_callback(cb)
    return cb


def read_selection_log(path: str | os.PathLike) -> list[dict]:
    """The rows of a selection log; a line that is not a row (a truncated or corrupt file) raises a one-line
    SelectionError naming the file and the line."""
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise SelectionError(f"irtuning: {path} line {number} is not valid JSON ({err.msg} at column "
                                         f"{err.colno}); the selection log is truncated or corrupt") from None
                if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
                    raise SelectionError(f"irtuning: {path} line {number} is not a selection-log row (a JSON object "
                                         f"with an integer step); the selection log is corrupt")
                rows.append(row)
    except UnicodeDecodeError as err:
        raise SelectionError(f"irtuning: {path} is not UTF-8 text ({err.reason} at byte {err.start}); the selection "
                             f"log is corrupt") from None
    return rows


def read_state_file(path: Path) -> dict:
    """A checkpoint's ``irtuning_state.pt``, loaded with weights_only=True (tensors and plain values only).
    Any failure is one SelectionError naming the file and what to do; torch's own message (which suggests
    weights_only=False, unsafe for a file from elsewhere) is not passed on."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every way a file can be unreadable gets the same advice
        raise SelectionError(f"irtuning: cannot read {path} ({type(err).__name__}): it is truncated, corrupt, or "
                             f"holds objects other than tensors and plain values, which irtuning does not load "
                             f"(unpickling them could run code from the file): {STATE_ADVICE}") from None
    resumes = saved.get("resumes", []) if isinstance(saved, dict) else None
    problem = (f"it holds a {type(saved).__name__}, not a dict" if not isinstance(saved, dict)
               else "no integer step" if isinstance(saved.get("step"), bool) or not isinstance(saved.get("step"), int)
               else "no engine state" if not isinstance(saved.get("engine"), dict)
               else "resumes is not a list of records" if not isinstance(resumes, list)
               or not all(isinstance(r, dict) for r in resumes) else "")
    if problem:
        raise SelectionError(f"irtuning: {path} is not a usable selection state ({problem}): {STATE_ADVICE}")
    return saved


def _write_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def _replace_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """``write`` a temporary file beside ``path``, then rename it over ``path``: a failed write leaves the
    previous file (or none), never a truncated one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def _close_quietly(fh: Any) -> None:
    try:
        fh.close()
    except Exception:  # noqa: BLE001 - the failure that matters was reported already
        pass


def _reraise(err: BaseException) -> None:
    raise err
