"""pytest-benchmark: one SmolLM2-135M LoRA training step (forward + backward, micro-batch 4, real revision
prompts with the prompt masked) with and without ``irtuning_label_logits_only``.

    OMP_NUM_THREADS=2 .venv/bin/pytest benchmarks/bench_label_logits.py \\
        --benchmark-json=benchmarks/results/label-logits-cpu-smollm2.json

Besides the time, each case records exact counts: the step's FLOPs (``torch.utils.flop_counter``) and
the positions the LM head projects; the ``on`` case also records the largest relative difference of its
LoRA gradients from the ``off`` case on the same batches (the cut is meant to change nothing but the cost).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.harness.training import LORA, TARGETS, PadCollator, tokenize_records

BATCHES = 6
MICRO_BATCH = 4


@pytest.fixture(scope="module")
def setup():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from irtuning_plugin.tasks.assets.references import data_dir_for, resolve_reference

    model_dir = resolve_reference("irtuning://smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(x) for x in open(Path(data_dir_for("revision-intention")) / "train.jsonl", encoding="utf-8")]
    data = tokenize_records(tokenizer, rows[:BATCHES * MICRO_BATCH], 256)
    collate = PadCollator(tokenizer.pad_token_id)
    batches = [collate(data[i:i + MICRO_BATCH]) for i in range(0, len(data), MICRO_BATCH)]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM",
                                            **{**LORA, "lora_dropout": 0.0}))
    model.train()
    return model, batches, {}


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach()


def _grads(model):
    return [p.grad.detach().double().clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("label_logits_only", [False, True], ids=["off", "on"])
def test_training_step(benchmark, setup, label_logits_only):
    from torch.utils.flop_counter import FlopCounterMode

    from irtuning_plugin import label_logits

    model, batches, shared = setup
    hook = label_logits.install(model) if label_logits_only else None
    try:
        widths = []
        probe = model.get_base_model().lm_head.register_forward_pre_hook(lambda m, a: widths.append(a[0].shape[1]))
        with FlopCounterMode(display=False) as fc:
            _step(model, batches[0])
        probe.remove()
        grads = _grads(model)
        if label_logits_only:
            ref = shared["grads"]
            rel = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) for a, b in zip(grads, ref))
            benchmark.extra_info["max_rel_grad_diff_vs_off"] = rel
            assert rel < 1e-5
        else:
            shared["grads"] = grads
        benchmark.extra_info.update(flops_per_step=fc.get_total_flops(), lm_head_positions=widths[0],
                                    sequence_positions=int(batches[0]["input_ids"].shape[1]), micro_batch=MICRO_BATCH,
                                    threads=torch.get_num_threads())
        it = iter(range(10 ** 9))
        benchmark.pedantic(lambda: _step(model, batches[1 + next(it) % (len(batches) - 1)]), rounds=10,
                           warmup_rounds=1)
    finally:
        if hook is not None:
            hook.remove()
