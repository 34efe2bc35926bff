"""The lab around :mod:`subspace_jax`: experiments, baselines, the demo and the benchmark.

The library (``subspace_jax``) holds the methods; this package holds what measures them:

* :mod:`subspace_lab.cli`: the ``subspace-jax`` command (``demo``, ``bench``, ``run``,
  ``info``, ``select``).
* :mod:`subspace_lab.experiments`: one module per experiment, with the shared flags of
  :mod:`subspace_lab.runner`; :mod:`subspace_lab.records` writes their results and
  :mod:`subspace_lab.analysis` holds the statistics and figures.
* :mod:`subspace_lab.baselines` (MiniLM fine-tuning baselines and the method recipe they
  run), :mod:`subspace_lab.pretrain` (the language-model baseline),
  :mod:`subspace_lab.nested_eval` (NSN's rank-sweep evaluation), :mod:`subspace_lab.demo`,
  :mod:`subspace_lab.bench` and :mod:`subspace_lab.rows` (their tables).
"""
