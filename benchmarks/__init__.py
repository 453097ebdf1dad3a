"""Scripts that measure the figures DESIGN.md names and append their rows to
``benchmarks/RESULTS.md``. Each runs from the repository root as a module,
``python -m benchmarks.NAME [--help]``, with difftune installed (or on ``PYTHONPATH``);
shared code: :mod:`benchmarks._results`."""
