"""LLaMA-Factory launcher: ``irtuning llamafactory train recipe.yaml`` (a LLaMA-Factory training YAML
plus ``irtuning_*`` keys). Validation needs no LLaMA-Factory; training calls its own ``run_exp``."""
