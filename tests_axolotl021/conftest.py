"""Axolotl 0.21 tests: run by `make test-axolotl021` in .venv-axolotl021 (Python 3.12), beside
tests/integration/test_axolotl_plugin.py; never by the main suite (Axolotl 0.19 has no plugin entry points)."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.join(_ROOT, "tests"))  # the Axolotl test helpers (base_cfg, run_axolotl)

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def built_in_assets():
    """Recipes in these tests name irtuning:// assets, which the Axolotl plugin and the LLaMA-Factory
    launcher resolve only once built (`irtuning prepare` builds them): the session builds them first."""
    from irtuning_plugin.tasks.assets.llamafactory_data import llamafactory_dataset_dir
    from irtuning_plugin.tasks.assets.models import prepare_tiny_llama

    prepare_tiny_llama()
    llamafactory_dataset_dir()  # the revision-intention data, then its LLaMA-Factory copy


@pytest.fixture(scope="session")
def tiny_model_dir():
    from irtuning_plugin.tasks.assets.models import prepare_tiny_llama

    return prepare_tiny_llama()
