"""mergelib: subspace-based model merging of CLIP experts (SCORE, ESM and their baselines).

The mathematics is pure functions over task vectors (dicts of tensors; :class:`TaskVector` adds
their arithmetic), registered by name in :data:`METHODS`; the models, data and protocols live in
their own modules.
"""

from .grid import merge_grid
from .methods import METHODS, merge
from .task_vectors import TaskVector, encoder_state, task_vector
from .task_vectors import apply_task_vector as apply

__version__ = "0.1.0"
__all__ = ["METHODS", "merge", "merge_grid", "apply", "TaskVector", "task_vector", "encoder_state", "__version__"]
