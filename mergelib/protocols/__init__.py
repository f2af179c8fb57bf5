"""The papers' evaluation protocols, as functions of experts and data: leave-one-domain-out
(:mod:`.domain_generalization`, SCORE), the multi-task benchmark (:mod:`.multitask`, ESM, TSV,
Iso) and the coefficient searches that both use (:mod:`.coefficients`).

Imports everything below it (methods, analysis, io, data, models), never the experiments or the
report.
"""
