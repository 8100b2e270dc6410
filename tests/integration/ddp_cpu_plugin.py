"""Test-only Axolotl plugin for the CPU DDP test (``plugins: [ddp_cpu_plugin.CPUDDPPlugin]``).

Axolotl 0.19 maps each rank to a GPU (``device_map = {"": LOCAL_RANK}``) when the world size is > 1;
on CPU the model must load with ``device_map: cpu`` (and ``ACCELERATE_USE_CPU=true`` must be set, or the
processes train separately). At train end every rank writes what it trained and selected to
``<output_dir>/rank<r>.json`` and its LoRA tensors to ``rank<r>_lora.pt``, so the test can compare ranks.
"""

import json
import os
from pathlib import Path

import torch
from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

TIMING = ("score_ms", "select_ms", "salf_calibration_s")


class RankDump(TrainerCallback):
    def __init__(self, trainer, output_dir):
        self.trainer, self.out, self.batches = trainer, Path(output_dir), []
        original = trainer.training_step

        def training_step(model, inputs, *args, **kwargs):
            ids = inputs["input_ids"]
            self.batches.append([int(ids.sum()), list(ids.shape)])
            return original(model, inputs, *args, **kwargs)

        trainer.training_step = training_step

    def on_train_end(self, args, state, control, model=None, **kwargs):
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if dist else int(os.environ.get("RANK", 0))
        wrapped = self.trainer.model_wrapped
        ddp = isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
        selection = next(cb for cb in self.trainer.callback_handler.callbacks if type(cb).__name__ ==
                         "LayerSelectionCallback")
        rows = [{k: v for k, v in r.items() if k not in TIMING} for r in selection.rows]
        lora = {n: p.detach().cpu().clone() for n, p in self.trainer.model.named_parameters() if "lora_" in n}
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(lora, self.out / f"rank{rank}_lora.pt")
        (self.out / f"rank{rank}.json").write_text(json.dumps({
            "rank": rank, "world_size": torch.distributed.get_world_size() if dist else 1,
            "backend": torch.distributed.get_backend() if dist else None, "ddp": ddp,
            "find_unused_parameters": bool(getattr(wrapped, "find_unused_parameters", False)),
            "batches": self.batches, "rows": rows, "global_step": state.global_step,
        }))


class CPUDDPPlugin(BasePlugin):
    def load_datasets(self, cfg, preprocess=False):
        # The first hook after Axolotl's normalize_config (which sets device_map to the local rank) and
        # before the model loader reads device_map; returning None keeps Axolotl's own dataset loading.
        cfg.device_map = "cpu"
        return None

    def add_callbacks_post_trainer(self, cfg, trainer):
        return [RankDump(trainer, cfg.output_dir)]
