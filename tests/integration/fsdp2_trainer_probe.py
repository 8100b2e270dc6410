"""``accelerate launch`` entry of the FSDP2 recipe test: the recipe's own Trainer (yaml_recipes/fsdp2/
train_fsdp2.py), plus a callback that writes, per rank, ``<output_dir>/rank<r>.json`` (world size, FSDP
version, whether the trained tensors are DTensors, the selection rows) and ``rank<r>.pt`` (the trained
tensors, gathered whole)."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

RECIPE = Path(__file__).resolve().parents[2] / "yaml_recipes" / "fsdp2" / "train_fsdp2.py"
TIMING = ("score_ms", "select_ms", "salf_calibration_s")


def load_recipe():
    spec = importlib.util.spec_from_file_location("train_fsdp2", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RankDump(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer
        self.fsdp: dict = {}
        self.batches: list[int] = []
        original = trainer.training_step

        def training_step(model, inputs, *args, **kwargs):
            self.batches.append(int(inputs["input_ids"].sum()))
            return original(model, inputs, *args, **kwargs)

        trainer.training_step = training_step

    def on_train_begin(self, args, state, control, **kwargs):
        plugin = getattr(self.trainer.accelerator.state, "fsdp_plugin", None)
        self.fsdp = {"fsdp_enabled": bool(self.trainer.is_fsdp_enabled),
                     "fsdp_version": getattr(plugin, "fsdp_version", None),
                     "distributed_type": str(self.trainer.accelerator.distributed_type),
                     "accelerator_fsdp2": bool(getattr(self.trainer.accelerator, "is_fsdp2", False)),
                     "fsdp_modules": sum(type(m).__name__.startswith("FSDP") for m in self.trainer.model.modules()),
                     "placements": str(next((getattr(p, "placements", None) for p in self.trainer.model.parameters()
                                             if p.requires_grad), None))}

    def on_train_end(self, args, state, control, **kwargs):
        from irtuning_plugin.distributed import is_sharded

        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        trainer = self.trainer
        selection = next(cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "LayerSelectionCallback")
        selectable = {id(p) for p in selection.engine._params}
        trained = [(n, p) for n, p in trainer.model.named_parameters() if id(p) in selectable]
        assert trained, "no selectable parameter found in the Trainer's model"
        weights = {n: (p.full_tensor() if is_sharded(p) else p).detach().cpu().clone() for n, p in trained}
        out = Path(args.output_dir)
        torch.save(weights, out / f"rank{rank}.pt")
        (out / f"rank{rank}.json").write_text(json.dumps({
            "rank": rank, "world": world, "backend": torch.distributed.get_backend(),
            **self.fsdp, "wrapped": type(trainer.model_wrapped).__name__, "batches": self.batches,
            "dtensor_params": all(is_sharded(p) for _, p in trained),
            "global_step": state.global_step,
            "rows": [{k: v for k, v in r.items() if k not in TIMING} for r in selection.rows],
            "resumes": selection.resumes,
            # the layers whose optimizer state this rank holds now (memory: as the uninterrupted run's)
            "state_layers": [i for i, ps in enumerate(selection.engine.layer_map.params)
                             if any(p in selection.engine.optimizer.state for p in ps)],
            "memory_account": selection.engine.memory_account(),
        }))


def force_fsdp_on_cpu(trainer) -> None:
    """accelerate (1.13) turns FSDP on only for GPU-type runs: with use_cpu its state is MULTI_CPU, the FSDP
    config is ignored and the Trainer wraps the model in DDP. For this CPU test only, make the Trainer's
    (shared) accelerate state an FSDP one, with the plugin that accelerate launch's FSDP_* variables
    describe, after the Trainer made its Accelerator and before train() prepares the model."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads FSDP_VERSION etc. from the environment
    state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


if __name__ == "__main__":
    recipe = load_recipe()
    args = recipe.parse_args(sys.argv[1:])
    trainer = recipe.build_trainer(args)
    if os.environ.get("IRTUNING_TEST_CPU_FSDP") == "1":
        force_fsdp_on_cpu(trainer)
    trainer.add_callback(RankDump(trainer))
    trainer.train(resume_from_checkpoint=args.resume)
