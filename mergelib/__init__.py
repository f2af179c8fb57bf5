"""mergelib: subspace-based model merging of CLIP experts (SCORE, ESM and their baselines).

The mathematics is pure functions over task vectors (dicts of tensors; :class:`TaskVector` adds
their arithmetic), registered by name in :data:`~mergelib.methods.registry.METHODS`. The subpackages, from the mathematics up
(each may import only those before it):

* :mod:`mergelib.methods`: the merging methods, their registry and the merge grid;
* :mod:`mergelib.io`: checkpoints, provenance, locks, merging checkpoint files;
* :mod:`mergelib.data`: the generated benchmarks and the real datasets' layouts;
* :mod:`mergelib.models`: CLIP backbones, heads, pretraining, fine-tuning, evaluation;
* :mod:`mergelib.analysis`: subspace overlap, ESD truncation, numerics, statistics of comparisons;
* :mod:`mergelib.protocols`: leave-one-domain-out, multi-task, coefficient searches;
* :mod:`mergelib.experiments`: the miniature, the replication, ablations, studies, sweeps;
* :mod:`mergelib.report`: published numbers, comparisons, the book's build and helpers;

with :mod:`mergelib.errors` and :mod:`mergelib.task_vectors` at the bottom and
``mergelib.cli`` (the command) at the top.
"""

from mergelib import _moved

from mergelib.methods.grid import merge_grid
from mergelib.methods import METHODS, merge
from mergelib.task_vectors import TaskVector, encoder_state, task_vector
from mergelib.task_vectors import apply_task_vector as apply

__version__ = "0.2.0"

_moved.install()
__all__ = ["METHODS", "merge", "merge_grid", "apply", "TaskVector", "task_vector", "encoder_state", "__version__"]
