"""What the benchmark studies share.

* ``grid``: cells run one after another, each in its own Python process; a cell's result file is written
  atomically, and a grid run with ``resume`` skips the cells already finished.
* ``training``: the one counted training loop (a transformers ``Trainer`` with the engine attached:
  FLOPs, step times and the engine's memory account per optimizer step), the shared recipe pieces
  (tokenisation, padding, the LoRA adapter), and the counters of the cost study.
* ``results``: the generated sections of ``RESULTS.md`` between ``<!-- NAME:start/end -->`` markers.
"""
