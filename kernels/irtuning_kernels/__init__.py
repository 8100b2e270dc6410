"""Per-layer gradient norms for layer-selection fine-tuning (import name ``irtuning_kernels``)."""

from irtuning_kernels.dispatch import LayerGradNorms, layer_grad_norms

__all__ = ["LayerGradNorms", "layer_grad_norms"]
