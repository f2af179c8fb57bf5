"""DARE: Drop And REscale (Yu et al., "Language Models are Super Mario", ICML 2024, arXiv 2311.03099).

Each task vector entry is dropped independently with probability ``p`` (``drop_rate``) and the
survivors are divided by ``1 - p``:

    tau^_t = (m_t ⊙ tau_t) / (1 - p),   m_t ~ Bernoulli(1 - p) element-wise,

so ``E[tau^_t] = tau_t`` (unbiased; without ``rescale`` the expectation is ``(1 - p) tau_t``).
The masked vectors are then merged by ``combine``:

* ``"sum"``: task arithmetic, ``tau = sum_t tau^_t`` (DARE + TA);
* ``"ties"``: TIES sign election and disjoint mean on the masked vectors (DARE + TIES), with a
  further TIES trim at ``ties_density`` (default 1.0: no further trim, DARE replaces TIES' trim as
  in MergeKit's ``dare_ties``; FusionBench trims again at 0.2). TIES runs with its global scope.

The global coefficient lambda is applied with the merged vector.

Parameters: ``drop_rate`` in [0, 1), default 0.9, the rate the paper's abstract highlights (90 %
of the delta parameters dropped without loss for fine-tuned models). The paper shows it holds when
the deltas are small, as they are for CLIP task vectors; it fails for large deltas (e.g. continued
pre-training), where a lower rate is needed (FusionBench's CLIP configs use 0.5).
``rescale`` (default True) divides the survivors by ``1 - p``. ``seed`` (default 0) fixes the masks.

Determinism: the mask of task ``t`` and tensor ``key`` is drawn on the CPU from a
``torch.Generator`` seeded with a SHA-256 hash of ``(seed, t, key)``, so the result is the same for
any key order and any compute device, and every (task, tensor) pair gets its own mask.

This module implements the paper's random strategy.

Where this follows the released code rather than the paper: see
``METHODS['dare'].code_notes`` and the book's Paper versus released code page.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from mergelib.errors import ParameterValueError
from mergelib.methods.common import Choice, Flag, Fraction, Integer, StateDict, merge_per_key
from mergelib.methods.registry import CodeNote, register
from mergelib.methods.ties import ties_merge

COMBINES = ("sum", "ties")


def mask_seed(seed: int, task: int, key: str) -> int:
    """A 63-bit generator seed from ``(seed, task, key)``, stable across runs and platforms."""
    digest = hashlib.sha256(f"{seed}\x1f{task}\x1f{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def drop_and_rescale(tensor: torch.Tensor, *, task: int, key: str, drop_rate: float, rescale: bool,
                     seed: int) -> torch.Tensor:
    """DARE on one task tensor: drop each entry with probability ``drop_rate``, rescale survivors."""
    if drop_rate > 0:
        generator = torch.Generator().manual_seed(mask_seed(seed, task, key))
        keep = torch.rand(tensor.shape, generator=generator) >= drop_rate  # drawn on the CPU
        tensor = torch.where(keep.to(tensor.device), tensor, 0.0)
    return tensor / (1.0 - drop_rate) if rescale else tensor


def check_combination(combine: str, ties_density: float) -> None:
    """``ties_density`` is TIES' trim: it has a meaning only with ``combine="ties"``."""
    if combine == "sum" and ties_density != 1.0:
        raise ParameterValueError("ties_density only applies with combine='ties'; leave it at 1.0 for combine='sum'")


@register(
    "dare",
    paper="Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch "
          "(Yu et al., ICML 2024)",
    arxiv="2311.03099",
    equation=r"\hat\tau_t = \frac{m_t \odot \tau_t}{1 - p},\ m_t \sim \operatorname{Bernoulli}(1 - p),\ "
             r"\tau = \sum_t \hat\tau_t\ \text{(or TIES on the } \hat\tau_t)",
    code_notes=(
        CodeNote("DARE in SCORE's comparison",
                 paper="SCORE's paper compares with DARE",
                 released="SCORE's code contains a DARE masking function (random and magnitude strategies) that "
                          "is never called: its `dare_ta` and `dare_ties` merges are plain task arithmetic and "
                          "plain TIES, and neither is a command-line choice",
                 mergelib="`dare` implements the DARE paper's random drop and rescale"),
    ),
    checks=dict(drop_rate=Fraction(zero_ok=True, one_ok=False), rescale=Flag(), seed=Integer(),
                combine=Choice(COMBINES), ties_density=Fraction(zero_ok=False, one_ok=True)),
    relation=lambda params: check_combination(params["combine"], params["ties_density"]),
)
def dare(
    task_vectors: Sequence[StateDict],
    *,
    device: torch.device | None = None,
    drop_rate: float = 0.9,
    rescale: bool = True,
    seed: int = 0,
    combine: str = "sum",
    ties_density: float = 1.0,
) -> StateDict:
    """DARE: randomly drop a fraction of each task vector, rescale the rest, then sum (or TIES).

    ``drop_rate`` in [0, 1); ``rescale`` divides survivors by ``1 - drop_rate``; ``seed`` fixes the
    masks; ``combine`` is ``"sum"`` (DARE + task arithmetic) or ``"ties"`` (DARE + TIES, trimming
    again at ``ties_density``).
    """

    def masked(task: int, key: str, tensor: torch.Tensor) -> torch.Tensor:
        return drop_and_rescale(tensor, task=task, key=key, drop_rate=drop_rate, rescale=rescale, seed=seed)

    if combine == "ties":
        return ties_merge(task_vectors, device=device, density=ties_density, scope="global", preprocess=masked)

    def merge_key(key: str, stack: torch.Tensor) -> torch.Tensor:
        for task in range(stack.shape[0]):
            stack[task] = masked(task, key, stack[task])
        return stack.sum(dim=0)

    return merge_per_key(task_vectors, merge_key, device=device)
