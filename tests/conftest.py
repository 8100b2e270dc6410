"""Test set-up shared by every test module.

TRITON_INTERPRET must be set before the kernel module is imported (Triton reads it at import).
The built-in assets go to a cache outside the repo; the tiny model is built once per session.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs (axolotl train, SmolLM2)")


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
