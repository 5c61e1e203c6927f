"""Benchmark support, the layer above the pipelines (it imports the runtime, nothing imports it).

- :mod:`.harness`: the plumbing every ``bench/*.py`` script shares: timing, copy bandwidth,
  dispatch counters (launches and bytes), tables, the final JSON line, and
  :func:`~.harness.setup_triton_env` (``TRITON_INTERPRET=1`` on a CPU, before triton loads).
- :mod:`.model`: the full-model benchmark behind ``bench/model.py`` and ``longcat-native bench``
  (its :func:`~.model.add_arguments` imports no torch, for the CLI's ``--help``).

Importing this package imports nothing: the modules load when named.
"""
