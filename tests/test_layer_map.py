"""irtuning_plugin.layer_map: which parameters belong to which decoder layer, and switching layers on and off.

(test_callback.py trains through a Sequential stack of decoder layers.)
"""

import pytest
import torch
from torch import nn

from irtuning_plugin.layer_map import LayerMapError, build_layer_map, find_decoder_layers, set_layers_trainable

from helpers_tiny import TARGETS, tiny_peft_llama


def tiny_llama(num_layers=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64))


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_plain_llama_full_scope_holds_every_block_parameter_once():
    model = tiny_llama()
    lm = build_layer_map(model, scope="full")
    assert lm.layers_path == "model.layers" and lm.layers is model.model.layers and lm.num_layers == 4
    for i, block in enumerate(model.model.layers):
        assert lm.names[i] == [n for n, _ in block.named_parameters()]
        assert all(a is b for a, b in zip(lm.params[i], block.parameters(), strict=True))
    assert lm.outside_trainable == ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    params, ids = lm.flat()
    assert len(params) == len(ids) == sum(len(ps) for ps in lm.params)
    assert ids == sorted(ids) and params[0] is lm.params[0][0] and params[-1] is lm.params[-1][-1]
    assert "4 layers at 'model.layers', scope=full" in lm.describe()


def test_adapter_scope_on_a_model_without_lora_is_refused_in_one_line():
    with pytest.raises(LayerMapError) as err:
        build_layer_map(tiny_llama(), scope="adapter")
    message = _one_line(err)
    assert "irtuning_scope='adapter'" in message and "irtuning_scope: full" in message


def test_peft_adapter_scope_vs_full_scope():
    model = tiny_peft_llama(num_layers=3)
    adapter = build_layer_map(model, scope="adapter")
    full = build_layer_map(model, scope="full")
    expected = {f"{module}.lora_{ab}.default.weight" for module in TARGETS for ab in "AB"}
    for i in range(3):
        names = {n.split(".", 1)[1] for n in adapter.names[i]}  # drop "self_attn." / "mlp."
        assert names == expected
        assert all(p.requires_grad for p in adapter.params[i])
        # full: every tensor of the block, the frozen base weights included, adapters among them
        block = adapter.layers[i]
        assert full.names[i] == [n for n, _ in block.named_parameters()]
        assert set(adapter.names[i]) < set(full.names[i])
        assert any(not p.requires_grad for p in full.params[i])
    assert adapter.outside_trainable == []  # PEFT froze everything but the adapters
    assert adapter.empty_layers == []


def test_layer_whose_adapter_is_frozen_holds_nothing_and_is_named():
    model = tiny_peft_llama(num_layers=3)
    for name, p in model.named_parameters():
        if ".layers.1." in name:
            p.requires_grad_(False)
    lm = build_layer_map(model)
    assert lm.num_layers == 3 and lm.params[1] == [] and lm.empty_layers == [1]
    assert "layers [1] hold nothing selectable" in lm.describe()


def test_set_layers_trainable_flips_requires_grad_and_clears_frozen_grads():
    model = tiny_llama()
    lm = build_layer_map(model, scope="full")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    set_layers_trainable(lm, [1, 3])
    for i, ps in enumerate(lm.params):
        for p in ps:
            assert p.requires_grad is (i in (1, 3))
            assert (p.grad is not None) is (i in (1, 3))
    # parameters outside the layers are never touched
    assert model.model.embed_tokens.weight.requires_grad and model.model.embed_tokens.weight.grad is not None
    # a backward now reaches only the selected layers
    for p in model.parameters():
        p.grad = None
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert [any(p.grad is not None for p in ps) for ps in lm.params] == [False, True, False, True]
    set_layers_trainable(lm, set())
    assert not any(p.requires_grad for ps in lm.params for p in ps)
    set_layers_trainable(lm, range(4))
    assert all(p.requires_grad for ps in lm.params for p in ps)


@pytest.mark.parametrize("path", ["model.decoder", "model.layers.9", "model..layers", "model.norm", "lm_head.weight"])
def test_bad_layers_path_is_one_line_naming_the_key(path):
    with pytest.raises(LayerMapError) as err:
        build_layer_map(tiny_llama(), scope="full", layers_path=path)
    message = _one_line(err)
    assert message.startswith(f"irtuning_layers_path={path!r} does not resolve")
    assert "candidates found: model.layers" in message


def test_unknown_scope_is_refused_listing_the_allowed_ones():
    with pytest.raises(LayerMapError) as err:
        build_layer_map(tiny_llama(), scope="layers")
    assert _one_line(err) == "irtuning_scope='layers'; allowed: adapter, full"


class _Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, width)


class _TwoStacks(nn.Module):
    """A small ModuleList of identical heads beside the (larger) block stack, and a mixed ModuleList."""

    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(4, 2) for _ in range(5)])
        self.mixed = nn.ModuleList([nn.Linear(64, 64), nn.LayerNorm(64)])
        self.blocks = nn.ModuleList([_Block(16) for _ in range(3)])


def test_the_largest_list_of_identical_modules_is_the_stack():
    model = _TwoStacks()
    path, layers = find_decoder_layers(model)
    assert path == "blocks" and layers is model.blocks  # not heads (smaller), not mixed (two kinds)
    assert find_decoder_layers(model, "heads")[1] is model.heads  # a named path wins


def test_no_list_of_blocks_asks_for_the_path():
    with pytest.raises(LayerMapError) as err:
        build_layer_map(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), scope="full")
    assert "set irtuning_layers_path" in _one_line(err)


def test_a_tensor_shared_between_blocks_belongs_to_the_first():
    model = _TwoStacks()
    model.blocks[2].lin.weight = model.blocks[0].lin.weight
    lm = build_layer_map(model, scope="full")
    assert lm.names == [["lin.weight", "lin.bias"], ["lin.weight", "lin.bias"], ["lin.bias"]]
    assert lm.params[0][0] is model.blocks[2].lin.weight


def test_layer_map_finds_blocks_through_peft_and_reports_outside_params():
    model = tiny_peft_llama()
    lm = build_layer_map(model)
    assert lm.num_layers == 6 and lm.layers_path.endswith("model.layers")
    assert all(len(ps) == 10 for ps in lm.params)  # A and B of q, k, v, up, down
    assert all("lora_" in n for ns in lm.names for n in ns)
    assert build_layer_map(model, layers_path="model.layers").layers is lm.layers  # relative to the base model
    full = build_layer_map(model, scope="full")
    assert len(full.params[0]) > 10
    with pytest.raises(LayerMapError, match="irtuning_layers_path='model.decoder' does not resolve"):
        build_layer_map(model, layers_path="model.decoder")
