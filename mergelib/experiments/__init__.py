"""Runs that produce stored results: the embedded miniature (:mod:`.miniature`), the
real-backbone replication (:mod:`.replication`), the ablations (:mod:`.ablations`), the studies
over recipes and seeds (:mod:`.seeds_study`), sweeps on SLURM or locally (:mod:`.sweep`) with
their job kinds (:mod:`.jobs`, :mod:`.benchmark_sweeps`), and the fine-tuning throughput
benchmark (``benchmarking``).

Imports the protocols and everything below them, never the report.
"""
