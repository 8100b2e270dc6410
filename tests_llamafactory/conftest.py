"""LLaMA-Factory tests: run by the LLaMA-Factory environment's pytest (`make test-llamafactory`), never by
the main suite (LLaMA-Factory 0.9.5 cannot share a venv with Axolotl 0.19)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


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


@pytest.fixture(scope="session")
def smollm2_dir():
    from irtuning_plugin.tasks.assets.models import prepare_smollm2

    return prepare_smollm2()
