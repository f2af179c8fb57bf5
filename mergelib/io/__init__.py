"""Files: checkpoints with provenance in their safetensors header (atomic writes, refusal of
files mergelib did not write), the provenance record of results (:mod:`.provenance`), owner locks
for shared result folders (:mod:`.locks`) and the merge of checkpoint files behind ``mergelib merge``
(:mod:`.merge_files`).

Imports :mod:`mergelib.methods` and :mod:`mergelib.task_vectors`, never models, protocols or
experiments.
"""
