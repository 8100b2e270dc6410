"""The benchmark studies of irtuning, run from the repository root as ``python -m benchmarks.<study>``.

``benchmarks.harness`` holds what every study shares: the grid of cells run in subprocesses, the counted
training loop and the writer of the generated sections of ``benchmarks/RESULTS.md``. Each study module
(``convergence``, ``run_comparison`` + ``strategy_bench``, ``cost_table`` + ``cost_count``,
``salf_analysis``) holds only what is its own: the cell it trains and the tables it writes.
"""
