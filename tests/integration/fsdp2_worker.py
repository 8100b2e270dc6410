"""Runs of the selection engine on a tiny Llama, sharded with FSDP2 over gloo ranks or in one process.

``run_cases(world, rank, cases, out)`` trains every case in ``cases`` in turn (the same process group for
all of them, so one spawn covers every strategy) and writes, per case and rank, ``<case>.rank<r>.json``
(the selection rows, per-step facts the test checks) and ``<case>.rank<r>.pt`` (the trained tensors,
gathered to full tensors). ``world == 1`` runs without a process group: the one-process reference, fed
the batches of all ranks at once, so its gradient is the mean the sharded ranks' reduce-scatter forms.

A case is a dict: ``name``, ``config`` (SelectionConfig keyword arguments), ``steps``, and optionally
``model`` ("lora" with ``rank`` r, or "full"), ``input_grad_hook`` (enable_input_require_grads first),
``resume_at`` (save a distributed checkpoint after that step, rebuild everything from scratch and go on).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

B, T, VOCAB, HIDDEN, LAYERS = 2, 12, 96, 32, 6
TIMING = ("score_ms", "select_ms", "salf_calibration_s")


def tiny_model(kind: str = "lora", lora_rank: int = 4, input_grad_hook: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    if input_grad_hook:
        model.enable_input_require_grads()
    if kind == "full":
        return model
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def decoder_layers(model):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]


def shard(model, world: int):
    """FSDP2 as accelerate applies it: each decoder layer, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def data(world: int, steps: int):
    """Token ids [steps, world, B, T]: rank r trains on [:, r]."""
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, VOCAB, (steps, world, B, T), generator=g)


class Batches(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone(), "attention_mask": torch.ones_like(self.ids[i])}


def loader_for(rank: int, world: int, steps: int):
    """The dataloader IST and SALF read: this rank's examples (all ranks' in one process)."""
    ids = data(2, steps)  # the sharded runs have 2 ranks
    mine = ids[:, rank] if world > 1 else ids  # [steps, (2,) B, T]
    return torch.utils.data.DataLoader(Batches(mine.reshape(-1, T)), batch_size=B * (2 if world == 1 else 1))


class Watch:
    """Per step: which decoder layers' outputs required grad (backward reaches them)."""

    def __init__(self, layers):
        self.steps: list[list[bool]] = []
        for i, layer in enumerate(layers):
            layer.register_forward_hook(self._hook(i))

    def _hook(self, i):
        def hook(module, args, output):
            if torch.is_grad_enabled() and module.training and self.steps:
                out = output[0] if isinstance(output, (tuple, list)) else output
                self.steps[-1][i] = bool(out.requires_grad)
        return hook


def full(t):
    from irtuning_plugin.distributed import is_sharded

    return t.full_tensor() if is_sharded(t) else t


def build(case: dict, world: int):
    from irtuning_plugin.config import SelectionConfig
    from irtuning_plugin.engine import LayerSelectionEngine

    model = tiny_model(case.get("model", "lora"), case.get("rank", 4), case.get("input_grad_hook", False))
    model.train()
    if world > 1:
        shard(model, world)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    engine = LayerSelectionEngine(model, SelectionConfig(**case["config"]), seed=5)
    return model, opt, engine


def checkpoint(model, opt, engine, path: Path, rank: int, world: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path / "dcp"))
    if rank == 0:
        torch.save(engine.state_dict(), path / "irtuning_state.pt")
    torch.distributed.barrier()


def restore(model, opt, path: Path) -> dict:
    """Load the sharded model and optimizer, then the engine state. The optimizer state of a parameter that
    never trained (or whose state ``drop`` deleted) is not in the checkpoint: get_state_dict creates one for
    every parameter, so those are loaded partially and deleted again, as the uninterrupted run has none."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    saved = set(dcp.FileSystemReader(str(path / "dcp")).read_metadata().state_dict_metadata)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path / "dcp"), planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for name, p in model.named_parameters():
        if p in opt.state and f"optim.state.{name}.step" not in saved:
            del opt.state[p]
    return torch.load(path / "irtuning_state.pt", weights_only=True)


def run_case(case: dict, world: int, rank: int, out: Path) -> None:
    steps = int(case["steps"])
    ids = data(2, steps)
    loader = loader_for(rank, world, steps)
    model, opt, engine = build(case, world)
    watch = Watch(decoder_layers(model))
    engine.begin(opt, loader)
    rows, facts = [], []
    for step in range(steps):
        if case.get("resume_at") == step:
            ckpt = out / f"{case['name']}.ckpt"
            checkpoint(model, opt, engine, ckpt, rank, world)
            engine.close()
            model, opt, engine = build(case, world)  # a fresh process would start from here
            watch = Watch(decoder_layers(model))
            engine.begin(opt, loader, state=restore(model, opt, ckpt))
        batch = ids[step, rank] if world > 1 else ids[step].reshape(-1, T)
        watch.steps.append([False] * LAYERS)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        engine.collect_scores()
        with_grad = sorted({lid for p, lid in zip(engine._params, engine._param_layer) if p.grad is not None})
        opt.step()
        state_layers = sorted({lid for p, lid in zip(engine._params, engine._param_layer) if p in opt.state})
        opt.zero_grad(set_to_none=True)
        row = engine.end_step(step + 1, loader)
        rows.append({k: v for k, v in row.items() if k not in TIMING})
        facts.append({"loss": float(loss.detach()), "with_grad": with_grad, "out_requires_grad": watch.steps[-1],
                      "state_layers": state_layers, "backward_cut": engine.backward_cut,
                      "memory": engine.memory_account()})
    weights = {n: full(p.detach()).clone() for n, p in model.named_parameters()
               if p.requires_grad or n in {x for ns in engine.layer_map.names for x in ns}}
    engine.close()
    (out / f"{case['name']}.rank{rank}.json").write_text(json.dumps({"rows": rows, "facts": facts, "world": world}))
    torch.save(weights, out / f"{case['name']}.rank{rank}.pt")


def run_cases(rank: int, world: int, cases: list[dict], out: str, init_file: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                             world_size=world)
    try:
        for case in cases:
            run_case(case, world, rank, Path(out))
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":  # python fsdp2_worker.py cases.json out_dir: both ranks, for a run by hand
    import torch.multiprocessing as mp

    cases_, out_ = json.loads(Path(sys.argv[1]).read_text()), sys.argv[2]
    mp.spawn(run_cases, args=(2, cases_, out_, str(Path(out_) / "pg")), nprocs=2)
