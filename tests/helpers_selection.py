"""Helpers shared by the engine, callback and strategy tests: a tiny run through attach_layer_selection with
a recorder of what trained, the layers an engine picks without training, and the check that only the
selected layers trained."""

import torch
from transformers import TrainerCallback

from irtuning_plugin.callback import attach_layer_selection
from irtuning_plugin.config import SelectionConfig
from irtuning_plugin.engine import LayerSelectionEngine
from irtuning_plugin.layer_map import build_layer_map

from helpers_tiny import make_trainer, tiny_peft_llama

L = 6  # layers of the tiny model


class Recorder(TrainerCallback):
    """Snapshots LoRA tensors around every step, gradients before clipping, and grad presence."""

    def __init__(self, layer_map):
        self.lm = layer_map
        self.before, self.changed, self.has_grad, self.unclipped_sq = [], [], [], []

    def wrap_clip(self, trainer):
        original = trainer.accelerator.clip_grad_norm_

        def clip(params, *a, **k):
            sq, ids = [], []
            for i, ps in enumerate(self.lm.params):
                for p in ps:
                    if p.grad is not None:
                        sq.append(p.grad.detach().double().pow(2).sum())
                        ids.append(i)
            self.unclipped_sq.append((torch.stack(sq), torch.tensor(ids)))
            return original(params, *a, **k)

        trainer.accelerator.clip_grad_norm_ = clip

    def on_step_begin(self, args, state, control, **kw):
        self.before = [[p.detach().clone() for p in ps] for ps in self.lm.params]

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.has_grad.append([[p.grad is not None for p in ps] for ps in self.lm.params])

    def on_step_end(self, args, state, control, **kw):
        self.changed.append([[not torch.equal(b, p.detach()) for b, p in zip(bs, ps)]
                             for bs, ps in zip(self.before, self.lm.params)])


def run_tiny(tmp_path, strategy="ir", max_steps=8, max_grad_norm=1e-3, **cfg):
    model = tiny_peft_llama()
    trainer = make_trainer(model, tmp_path, max_steps=max_steps, max_grad_norm=max_grad_norm)
    cb = attach_layer_selection(trainer, SelectionConfig(strategy=strategy, **cfg))
    rec = Recorder(build_layer_map(model))
    rec.wrap_clip(trainer)  # ours wraps this wrapper at train begin, so both see unclipped gradients
    trainer.add_callback(rec)
    trainer.train()
    return cb, rec, trainer


def assert_only_selected_layers_trained(rows, rec):
    for step, row in enumerate(rows):
        for layer in range(L):
            changed, grads = rec.changed[step][layer], rec.has_grad[step][layer]
            if layer in row["active"]:
                assert all(changed) and all(grads), (step, layer)
            else:
                assert not any(changed) and not any(grads), f"frozen layer {layer} trained at step {step + 1}"


def selections(strategy, seed=0, steps=8, dataloader=None, **options):
    """The layers each step trains, from an engine driven without training (begin + end_step)."""
    engine = LayerSelectionEngine(tiny_peft_llama(), SelectionConfig(strategy=strategy, strategy_options=options),
                                  seed=seed)
    out = [engine.begin(None, dataloader, check_optimizer=False)]
    rows = [engine.end_step(step, dataloader) for step in range(1, steps + 1)]
    return out + [r["next_active"] for r in rows], rows


TIMING = ("score_ms", "select_ms", "salf_calibration_s")


def without_timing(rows):
    """Selection-log rows without their timing fields (they differ between two runs of the same selection)."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def engine_steps(model, engine, opt, data, device):
    """A manual training loop with the engine (no Trainer): after each optimizer step, yields the step number
    and the layers that trained in it."""
    for step, batch in enumerate(data, start=1):
        trained = set(engine.active)
        model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
        engine.collect_scores()
        opt.step()
        opt.zero_grad(set_to_none=True)
        engine.end_step(step)
        yield step, trained
