"""Import public fine-tuned CLIP image encoders into mergelib's safetensors checkpoints, once.

Formats read (facts from the released code and the model cards of the repositories below):

* **task_vectors lineage** (Ilharco et al., arXiv 2212.04089; tall_masks, arXiv 2405.07813; TSV,
  arXiv 2412.00081; Iso, arXiv 2502.04959; ESM, arXiv 2602.20208; SCORE, arXiv 2603.05768). Their checkpoints are
  ``torch.save`` files of the ``ImageEncoder`` wrapper (``.model`` is an open_clip ``CLIP`` whose
  text ``transformer`` was deleted). tall_masks' ``torch_save`` saves its *state dict* (keys
  ``model.visual.*`` plus text leftovers ``model.token_embedding.weight``, ``model.logit_scale``,
  ...); the original task_vectors code and SCORE's ``zeroshot.pt`` pickle the *whole module*, whose
  classes live in ``src.modeling`` (``src.models.modeling`` in tall_masks and TSV). Older files
  are plain ``pickle.dump`` output, some of them dicts of numpy arrays. Layout of the Google
  Drive folders and of the Hugging Face mirror ``nik-dim/tall_masks``:
  ``{root}/{model}/{Task}Val/nonlinear_finetuned.pt``, ``.../nonlinear_zeroshot.pt`` (the released
  code uses the ``MNISTVal`` copy as θ₀) and heads ``{root}/{model}/head_{Task}Val.pt``; the
  task_vectors Drive uses ``{root}/{model}/{Task}/finetuned.pt`` and ``{root}/{model}/zeroshot.pt``.
  Heads are not imported: mergelib builds its own zero-shot heads (:mod:`mergelib.models.heads`).
* **FusionBench** (``tanganke/clip-vit-base-patch32_<task>`` and the B/16, L/14 ones): Hugging
  Face ``CLIPVisionModel`` checkpoints (``model.safetensors`` or ``pytorch_model.bin``), keys
  ``vision_model.*``. ``CLIPModel`` / ``CLIPVisionModelWithProjection`` files add
  ``visual_projection.weight``. :func:`hf_to_open_clip` maps the names (transformers'
  ``modeling_clip.py``): q/k/v projections are concatenated in that order into open_clip's
  ``attn.in_proj_*`` (the packing of ``torch.nn.MultiheadAttention``) and ``visual.proj`` is the
  transpose of ``visual_projection.weight``. transformers ≥ 5 writes a bare ``CLIPVisionModel``
  without the ``vision_model.`` prefix (``embeddings.*``, ``encoder.layers.*``); both are read.
  A ``CLIPVisionModel`` has **no visual projection**: ``visual.proj`` is then missing and the
  import fails unless ``fill_from=`` gives a pretrained state to take it from; it is then the
  pretrained projection (its task vector is zero, which matches FusionBench's fine-tuning, where
  the projection is not part of the vision model) and the manifest lists it under ``filled_keys``.
  The activation is not stored in any of these files: the backbone named on import decides it
  (QuickGELU for the OpenAI ViTs, as in every one of these code bases).

**Safety rule.** Unpickling a file can run arbitrary code. mergelib never unpickles except in
:func:`import_pickled_checkpoint`, an explicit step the user calls (directly or through
:func:`import_checkpoint` / :func:`import_directory`) on files they trust; everything else,
:func:`load_imported` included, reads safetensors. :func:`import_pickled_checkpoint` first tries
``torch.load(..., weights_only=True)`` (enough for plain state dicts, and safe); only with
``trust_pickle=True`` does it unpickle whole objects, through a shim unpickler that replaces the
classes of the task_vectors lineage (``src.modeling.ImageEncoder``, ``ClassificationHead``, ...)
and any class that cannot be imported here with inert stand-ins that only hold attributes, so the
original repositories are not needed and their code is never imported. The tensors are then read
from the objects' ``_parameters`` / ``_buffers`` (what ``state_dict()`` would return) without
calling any of their methods.

Every import normalises the keys to open_clip's image-encoder names (``visual.*``, as
:mod:`mergelib.task_vectors`), drops the text side, checks keys and shapes against the backbone
(:func:`check_architecture`), casts floating tensors to the backbone's dtype and writes
``{destination}.safetensors`` with its manifest (source path and SHA-256, format, backbone, filled
and dropped keys, provenance) in the file's header, atomically, with
:func:`mergelib.io.checkpoints.save_state`. An import never writes over its source (compared as
files), nor over a file mergelib did not write unless ``overwrite=True``; the destination's
folder is checked to be writable before the source is read. Imports written by older mergelib
versions (a ``.json`` manifest beside the weights) are not read as imported: importing again
replaces them.
"""

from __future__ import annotations

import functools
import pickle
import re
import sys
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Literal, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mergelib.models.backbones import BACKBONES, create_clip
from mergelib.io.checkpoints import (
    check_not_an_input,
    check_replaceable,
    check_writable,
    config_hash,
    is_mergelib_file,
    load_state,
    read_manifest,
    save_state,
    sha256_file,
    shape_problems,
    verify_checkpoint,
)
from mergelib.errors import CorruptCheckpointError, MergelibError, ParameterValueError, lookup
from mergelib.methods.common import block_layer
from mergelib.io.provenance import provenance
from mergelib.task_vectors import PREFIX, StateDict, encoder_state

#: Bump when the conversion changes what an import writes (part of every manifest's ``key``).
IMPORTER_VERSION = 1

Format = Literal["auto", "open_clip", "hf"]
FORMATS = ("auto", "open_clip", "hf")


class CheckpointMismatchError(MergelibError, ValueError):
    """A checkpoint's keys or shapes do not fit the backbone it is imported or loaded for."""


class CheckpointFormatError(MergelibError, ValueError):
    """A checkpoint's content is not an image encoder mergelib can read (no or unknown keys)."""


class UntrustedPickleError(MergelibError, PermissionError):
    """A checkpoint holds pickled Python objects and ``trust_pickle=True`` was not given."""


# --------------------------------------------------------------------------------------------
# Unpickling (the only place): stand-ins and the shim unpickler
# --------------------------------------------------------------------------------------------

#: Modules of the task_vectors lineage whose classes are always replaced by stand-ins, never
#: imported; so is everything under ``src`` (a ``src`` package on the user's path could be anything).
LINEAGE_MODULES = frozenset({"src.modeling", "src.models.modeling", "src.heads", "src.models.heads", "modeling", "heads"})


def is_lineage_module(module: str) -> bool:
    return module in LINEAGE_MODULES or module == "src" or module.startswith("src.")


class PickledStandIn:
    """Inert replacement for a pickled class that is not imported: it only keeps what it is given.

    Pickle rebuilds an ``nn.Module`` subclass as ``cls.__new__(cls)`` followed by
    ``__setstate__(module.__dict__)``, so a stand-in ends up holding the module's ``_parameters``,
    ``_buffers`` and ``_modules`` dicts, which is all the tensor extraction reads.
    """

    original_name: ClassVar[str] = "?"

    def __init__(self, *args: Any, **kwargs: Any):  # when pickle *calls* the class (REDUCE)
        self.__dict__["_standin_args"] = (args, kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # (dict, slots)
            state = {**(state[0] or {}), **state[1]}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_standin_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:  # stand-ins of dict subclasses
        self.__dict__.setdefault("_standin_items", {})[key] = value

    def append(self, value: Any) -> None:  # stand-ins of list subclasses
        self.__dict__.setdefault("_standin_list", []).append(value)

    def extend(self, values: Iterable[Any]) -> None:
        self.__dict__.setdefault("_standin_list", []).extend(values)

    def __repr__(self) -> str:
        return f"<stand-in for {self.original_name}>"


@functools.lru_cache(maxsize=None)
def stand_in_class(module: str, name: str) -> type:
    """The (cached) stand-in class for ``module.name``, a subclass of :class:`PickledStandIn`."""
    return type(name, (PickledStandIn,), {"original_name": f"{module}.{name}", "__module__": __name__})


class ShimUnpickler(pickle.Unpickler):
    """Unpickler that resolves the task_vectors lineage's classes, and missing ones, to stand-ins.

    Everything else (torch, collections, open_clip, torchvision, numpy, ...) is imported as usual,
    which is why this is used only on files the user trusts.
    """

    def find_class(self, module: str, name: str) -> Any:
        if is_lineage_module(module):
            return stand_in_class(module, name)
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):  # class moved or removed since the file was written
            return stand_in_class(module, name)


def _shim_pickle_module() -> types.ModuleType:
    """A module with the interface ``torch.load(pickle_module=...)`` uses (``Unpickler``, ``load``)."""
    shim = types.ModuleType("mergelib_pickle_shim")
    shim.Unpickler = ShimUnpickler  # type: ignore[attr-defined]
    shim.load = lambda file, **kwargs: ShimUnpickler(file, **kwargs).load()  # type: ignore[attr-defined]
    shim.__version__ = "1"  # type: ignore[attr-defined]
    return shim


# torch's legacy (pre-1.6) serialization starts with the pickle of this magic number.
_TORCH_LEGACY_HEADER = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)


def _container_kind(path: Path) -> str:
    """``"torch-zip"``, ``"torch-legacy"`` or ``"pickle"`` from the file's first bytes."""
    with open(path, "rb") as handle:
        head = handle.read(len(_TORCH_LEGACY_HEADER))
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if head == _TORCH_LEGACY_HEADER:
        return "torch-legacy"
    return "pickle"


def _refusal(path: Path, torch_message: str) -> UntrustedPickleError:
    found = re.search(r"GLOBAL (\S+)", torch_message)
    what = f"objects of class {found.group(1)}" if found else "Python objects that are not plain tensors"
    return UntrustedPickleError(
        f"{path} holds pickled {what}, not only a state dict of tensors. Loading it executes code "
        "named inside the file (arbitrary code execution if the file was tampered with), so mergelib "
        "does not do it unless asked. If you trust where the file comes from, import it once with "
        "import_checkpoint(..., trust_pickle=True) (or import_directory(..., trust_pickle=True)); "
        "classes of the task_vectors code (src.modeling.ImageEncoder, ...) are replaced by stand-ins, "
        "so the original repository is not needed. The import writes safetensors, which every later "
        "load reads without unpickling."
    )


def _corrupt(path: Path, error: BaseException) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path}: cannot be read as a PyTorch checkpoint ({type(error).__name__}: {str(error).splitlines()[0][:200]}). "
        "The file is probably truncated (an interrupted download) or not a checkpoint; download it again."
    )


def import_pickled_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """Read a ``torch.save`` / ``pickle`` checkpoint into a flat dict of tensors (names unchanged).

    The only function of mergelib that unpickles. ``torch.load(weights_only=True)`` is tried
    first; it reads plain state dicts and cannot run code. A file holding other objects (a whole
    pickled ``ImageEncoder``, a dict of numpy arrays) is refused with
    :class:`UntrustedPickleError` unless ``trust_pickle=True``, in which case it is unpickled by
    :class:`ShimUnpickler` and the tensors are collected from the objects.

    Returns ``(tensors, container)`` where container is ``"state_dict"`` (weights-only load) or
    ``"pickled_object"`` (trusted unpickling).
    Raises :class:`mergelib.errors.CorruptCheckpointError` for a truncated or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint to import not found: {path}")
    kind = _container_kind(path)
    if kind == "torch-zip" and not zipfile.is_zipfile(path):
        raise CorruptCheckpointError(
            f"{path}: a PyTorch zip checkpoint without its central directory: the file is truncated "
            "(an interrupted download or copy); download it again."
        )
    if kind != "pickle":  # a raw pickle never passes the weights-only unpickler
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            return extract_tensors(loaded, path), "state_dict"
        except pickle.UnpicklingError as error:
            if "Weights only load failed" not in str(error):
                raise _corrupt(path, error) from error
            refusal_message = str(error)
        except (RuntimeError, EOFError, OSError, ValueError) as error:
            raise _corrupt(path, error) from error
    else:
        refusal_message = ""
    if not trust_pickle:
        raise _refusal(path, refusal_message)
    try:
        if kind == "pickle":
            with open(path, "rb") as handle:
                # latin1: pickles written by Python 2 (old numpy-array state dicts) decode as bytes
                loaded = ShimUnpickler(handle, encoding="latin1").load()
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_shim_pickle_module())
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, OSError) as error:
        raise _corrupt(path, error) from error
    return extract_tensors(loaded, path), "pickled_object"


def _as_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if type(value).__module__ == "numpy" and hasattr(value, "dtype") and hasattr(value, "shape"):
        return torch.from_numpy(value)
    return None


def _module_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """What ``state_dict()`` returns, read from the attributes only (works on stand-ins too)."""
    attributes = vars(obj)
    non_persistent = attributes.get("_non_persistent_buffers_set") or set()
    for name, value in (attributes.get("_parameters") or {}).items():
        if value is not None:
            yield prefix + name, value.detach()
    for name, value in (attributes.get("_buffers") or {}).items():
        if value is not None and name not in non_persistent:
            yield prefix + name, value.detach()
    for name, child in (attributes.get("_modules") or {}).items():
        if child is not None:
            yield from _module_tensors(child, f"{prefix}{name}.")


def _is_module_like(obj: Any) -> bool:
    return isinstance(obj, torch.nn.Module) or isinstance(getattr(obj, "__dict__", {}).get("_modules"), dict)


def extract_tensors(obj: Any, source: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """The flat ``name -> tensor`` dict held by a loaded checkpoint object.

    Accepts a state dict (tensor or numpy values), a wrapper dict with ``state_dict`` /
    ``model_state_dict`` / ``model`` entries (open_clip's and Lightning's training checkpoints),
    or a module (real or stand-in).
    """
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model_state_dict"):
            if isinstance(obj.get(wrapper), Mapping):
                return extract_tensors(obj[wrapper], source)
        tensors = {str(k): t for k, v in obj.items() if (t := _as_tensor(v)) is not None}
        if tensors:
            return tensors
        if "model" in obj:
            return extract_tensors(obj["model"], source)
        raise CheckpointFormatError(f"{source}: a dict without tensors (keys: {sorted(map(str, obj))[:8]})")
    if _is_module_like(obj):
        tensors = dict(_module_tensors(obj))
        if tensors:
            return tensors
    raise CheckpointFormatError(
        f"{source}: holds a {type(obj).__module__}.{type(obj).__qualname__}, neither a state dict nor a module "
        "with parameters; mergelib cannot find the image encoder's weights in it."
    )


# --------------------------------------------------------------------------------------------
# Key normalisation: open_clip and Hugging Face names
# --------------------------------------------------------------------------------------------

def normalize_open_clip_keys(state: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """Keep the image encoder, renamed ``visual.*``; return ``(state, dropped keys)``.

    The name is taken from its first ``visual`` component, so any prefix is accepted:
    ``model.visual.`` (tall_masks' ImageEncoder state dicts), ``image_encoder.model.visual.``
    (an ImageClassifier), ``module.`` (DataParallel), ``visual.`` itself. Keys without one (the
    text side, classification heads, ``logit_scale``) are dropped.
    """
    kept: StateDict = {}
    origin: dict[str, str] = {}
    dropped = []
    for key, value in state.items():
        parts = key.split(".")
        if "visual" not in parts:
            dropped.append(key)
            continue
        name = ".".join(parts[parts.index("visual"):])
        if name in kept:
            raise CheckpointFormatError(
                f"keys {origin[name]!r} and {key!r} both map to {name!r}: the checkpoint holds two image "
                "encoders; extract the one you want into its own state dict first."
            )
        kept[name], origin[name] = value, key
    return kept, dropped


_HF_TOP = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}
_HF_LAYER = {  # per encoder layer, besides q/k/v which are concatenated
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_HF_IGNORED = {"embeddings.position_ids"}  # a buffer of positions 0..N-1, no weights
_HF_VISION_ROOTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")


def _hf_vision_name(key: str) -> str | None:
    """The name inside the vision tower, or None for text-side / other keys."""
    parts = key.split(".")
    if "vision_model" in parts:
        return ".".join(parts[parts.index("vision_model") + 1:])
    if "text_model" in parts:
        return None
    while parts and parts[0] == "module":  # DataParallel around a bare transformers-5 CLIPVisionModel
        parts = parts[1:]
    name = ".".join(parts)
    return name if name.startswith(_HF_VISION_ROOTS) else None


def looks_like_hf(state: Mapping[str, Any]) -> bool:
    """Whether the keys are Hugging Face CLIP names (``vision_model.*`` or bare ``embeddings.patch_embedding``)."""
    return any("vision_model" in k.split(".") or k.endswith("embeddings.patch_embedding.weight") for k in state)


def hf_to_open_clip(state: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """Hugging Face ``CLIPVisionModel`` / ``CLIPModel`` state dict → open_clip ``visual.*`` names.

    Returns ``(state, dropped keys)``. ``visual.proj`` is produced only when the checkpoint has
    ``visual_projection.weight`` (``CLIPModel``, ``CLIPVisionModelWithProjection``).
    """
    vision: dict[str, torch.Tensor] = {}
    projection = None
    dropped = []
    for key, value in state.items():
        parts = key.split(".")
        if parts[-2:] == ["visual_projection", "weight"] and "text_model" not in parts:
            projection = value
            continue
        name = _hf_vision_name(key)
        if name is None or name in _HF_IGNORED:
            dropped.append(key)
        else:
            vision[name] = value
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for name, value in vision.items():
        if name in _HF_TOP:
            out[PREFIX + _HF_TOP[name]] = value
            continue
        match = _HF_LAYER_KEY.fullmatch(name)
        if match is None:
            unknown.append(name)
            continue
        layer, module, kind = int(match.group(1)), match.group(2), match.group(3)
        block = f"{PREFIX}transformer.resblocks.{layer}."
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((layer, kind), {})[module[-6]] = value
        elif module in _HF_LAYER:
            out[f"{block}{_HF_LAYER[module]}.{kind}"] = value
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointFormatError(
            f"unrecognised Hugging Face CLIP vision keys {sorted(unknown)[:5]}: not a CLIP ViT (or a variant "
            "mergelib does not map); expected the names of transformers' CLIPVisionModel."
        )
    for (layer, kind), parts in sorted(qkv.items()):
        if sorted(parts) != ["k", "q", "v"]:
            raise CheckpointFormatError(f"encoder layer {layer}: {kind} of q/k/v projections incomplete (found {sorted(parts)})")
        # nn.MultiheadAttention packs the input projection as rows [q; k; v]
        out[f"{PREFIX}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if projection is not None:
        out[PREFIX + "proj"] = projection.t()  # Linear(width -> embed) weight is proj transposed
    if not out:
        raise CheckpointFormatError("no Hugging Face CLIP vision keys found (expected vision_model.* names)")
    return out, dropped


def open_clip_to_hf(state: Mapping[str, torch.Tensor], *, prefix: str = "vision_model.") -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_open_clip`: open_clip ``visual.*`` → HF names (legacy ``vision_model.`` prefix).

    ``visual.proj`` becomes ``visual_projection.weight`` (as in ``CLIPModel``); leave it out of
    ``state`` for a plain ``CLIPVisionModel``. ``prefix=""`` gives transformers 5's bare
    ``CLIPVisionModel`` names.
    """
    top = {v: k for k, v in _HF_TOP.items()}
    layer_names = {v: k for k, v in _HF_LAYER.items()}
    out = {}
    for key, value in state.items():
        if not key.startswith(PREFIX):
            raise CheckpointFormatError(f"open_clip_to_hf expects visual.* keys, got {key!r}")
        name = key[len(PREFIX):]
        if name == "proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif name in top:
            out[prefix + top[name]] = value.clone()
        elif (match := block_layer(key)) is not None:
            layer, rest = match
            hf_layer = f"{prefix}encoder.layers.{layer}."
            if rest.startswith("attn.in_proj_"):
                kind = rest[len("attn.in_proj_"):]
                for letter, chunk in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{hf_layer}self_attn.{letter}_proj.{kind}"] = chunk.clone()
            else:
                module, kind = rest.rsplit(".", 1)
                if module not in layer_names:
                    raise CheckpointFormatError(f"no Hugging Face name for {key!r}")
                out[f"{hf_layer}{layer_names[module]}.{kind}"] = value.clone()
        else:
            raise CheckpointFormatError(f"no Hugging Face name for {key!r}")
    return out


def to_open_clip(state: Mapping[str, torch.Tensor], format: Format = "auto") -> tuple[StateDict, list[str], str]:
    """Normalise a raw state dict to ``visual.*`` names: ``(state, dropped keys, format used)``."""
    lookup({f: f for f in FORMATS}, "checkpoint format", format)
    resolved = ("hf" if looks_like_hf(state) else "open_clip") if format == "auto" else format
    converted, dropped = hf_to_open_clip(state) if resolved == "hf" else normalize_open_clip_keys(state)
    if not converted:
        examples = sorted(state)[:5]
        raise CheckpointFormatError(
            f"no image-encoder keys found (format {resolved!r}); expected open_clip names containing "
            f"'visual.' (e.g. model.visual.conv1.weight) or Hugging Face 'vision_model.*' names; the "
            f"checkpoint's keys look like {examples}"
        )
    return converted, dropped, resolved


# --------------------------------------------------------------------------------------------
# Architecture check
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _reference_visual(backbone: str) -> tuple[tuple[str, tuple[int, ...], torch.dtype], ...]:
    # Built on the meta device: shapes and dtypes of create_clip(backbone, weights=None)'s image
    # encoder without allocating (ViT-L-14 would otherwise take seconds and gigabytes).
    with torch.device("meta"):
        clip = create_clip(backbone, weights=None, device="meta")
    return tuple((k, tuple(v.shape), v.dtype) for k, v in encoder_state(clip.model.visual).items())


def expected_visual_shapes(backbone: str) -> dict[str, tuple[int, ...]]:
    """``visual.*`` key → shape of ``backbone``'s image encoder (as ``encoder_state`` of ``create_clip``)."""
    return {k: shape for k, shape, _ in _reference_visual(backbone)}


def matching_backbones(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Registered backbones whose image encoder has exactly these keys and shapes (``visual.proj`` may be missing)."""
    found = []
    for name in BACKBONES:
        expected = expected_visual_shapes(name)
        if all(k in expected and tuple(v.shape) == expected[k] for k, v in state.items()) and set(expected) - set(state) <= {
            PREFIX + "proj"
        }:
            found.append(name)
    return found


def check_architecture(state: Mapping[str, torch.Tensor], backbone: str, *, source: str | Path = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state`` has exactly ``backbone``'s image-encoder keys and shapes."""
    problems = shape_problems(state, expected_visual_shapes(backbone))
    if not problems:
        return
    others = [name for name in matching_backbones(state) if name != backbone]
    if others:
        hint = f"Its shapes match the registered backbone {others[0]!r}: import it with backbone={others[0]!r}."
    else:
        hint = f"Its shapes match none of the registered backbones ({', '.join(BACKBONES)})."
    if len(problems) == 1 and PREFIX + "proj" not in state and PREFIX + "proj" in expected_visual_shapes(backbone):
        hint = (
            "Only visual.proj is missing, as in a Hugging Face CLIPVisionModel (which has no projection): "
            "pass fill_from=<the pretrained state of this backbone> to take it from the pretrained model "
            "(its task vector is then zero)."
        )
    raise CheckpointMismatchError(
        f"{source} does not fit backbone {backbone!r}: {len(problems)} key/shape differences, first "
        f"{'; '.join(problems[:4])}. {hint}"
    )


# --------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------

#: The weights files of a Hugging Face model folder, in the order they are looked for.
HF_WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.bin")


def is_model_folder(path: str | Path) -> bool:
    """Whether ``path`` is a Hugging Face model folder (it holds one of :data:`HF_WEIGHTS_NAMES`)."""
    return Path(path).is_dir() and any((Path(path) / name).is_file() for name in HF_WEIGHTS_NAMES)


def _weights_file(source: Path) -> Path:
    """The weights file of ``source``; a directory is a Hugging Face model folder."""
    if not source.is_dir():
        return source
    for name in HF_WEIGHTS_NAMES:
        if (source / name).is_file():
            return source / name
    raise FileNotFoundError(
        f"{source} is a directory without {' or '.join(HF_WEIGHTS_NAMES)}; pass the checkpoint file itself, "
        f"or a folder in the layout {{root}}/{{model}}/{{Task}}Val/{FINETUNED_NAMES[0]} to import_directory"
    )


def read_checkpoint(source: str | Path, *, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """Raw tensors of a checkpoint file (safetensors read directly, anything else through
    :func:`import_pickled_checkpoint`): ``(tensors, container)``."""
    path = _weights_file(Path(source))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint to import not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path)), "safetensors"
        except (SafetensorError, OSError) as error:
            raise _corrupt(path, error) from error
    return import_pickled_checkpoint(path, trust_pickle=trust_pickle)


def _fill_state(fill_from: Mapping[str, torch.Tensor] | str | Path) -> tuple[StateDict, str]:
    """The pretrained ``visual.*`` state to fill missing keys from, and how to name it in the manifest."""
    if isinstance(fill_from, Mapping):
        return normalize_open_clip_keys(fill_from)[0], "<state dict passed in memory>"
    path = Path(fill_from)
    if path.suffix != ".safetensors":
        raise ParameterValueError(
            f"fill_from={path}: must be a state dict or a .safetensors file (import a pickled pretrained "
            "checkpoint first with import_checkpoint)"
        )
    state = load_state(path)[0] if is_mergelib_file(path) else load_file(str(path))
    return normalize_open_clip_keys(state)[0], str(path)


@dataclass(frozen=True)
class ConvertedCheckpoint:
    """An image-encoder state ready to save, with what the conversion did."""

    state: StateDict
    source_format: str
    container: str
    filled_keys: list[str]
    fill_from: str | None
    dropped_keys: list[str]
    cast: dict[str, str]  # key -> source dtype, for tensors cast to the backbone's dtype


def convert_checkpoint(
    source: str | Path,
    *,
    backbone: str,
    format: Format = "auto",
    trust_pickle: bool = False,
    fill_from: Mapping[str, torch.Tensor] | str | Path | None = None,
) -> ConvertedCheckpoint:
    """Read, normalise, fill and check a checkpoint in memory (nothing is written)."""
    lookup(BACKBONES, "backbone", backbone)
    raw, container = read_checkpoint(source, trust_pickle=trust_pickle)
    state, dropped, resolved = to_open_clip(raw, format)
    reference = {k: (shape, dtype) for k, shape, dtype in _reference_visual(backbone)}
    filled: list[str] = []
    fill_name = None
    missing = [k for k in reference if k not in state]
    if missing and fill_from is not None:
        pretrained, fill_name = _fill_state(fill_from)
        filled = [k for k in missing if k in pretrained]
        for key in filled:
            state[key] = pretrained[key]
        if filled:
            print(f"[mergelib] {source}: {len(filled)} keys taken from the pretrained state: {filled}", file=sys.stderr)
    check_architecture(state, backbone, source=source)
    cast = {}
    out: StateDict = {}
    for key, (_, dtype) in reference.items():
        tensor = state[key]
        if tensor.dtype != dtype and tensor.is_floating_point():
            cast[key] = str(tensor.dtype).removeprefix("torch.")
        # clone: tensors unpickled from one module may share storage, which safetensors refuses
        out[key] = tensor.to(dtype).contiguous().clone() if tensor.is_floating_point() else tensor.clone()
    return ConvertedCheckpoint(out, resolved, container, filled, fill_name, dropped, cast)


def _check_destination(destination: Path) -> None:
    if destination.suffix != ".safetensors":
        raise ParameterValueError(f"destination {destination} must end in .safetensors")


def import_checkpoint(
    source: str | Path,
    destination: str | Path,
    *,
    backbone: str,
    format: Format = "auto",
    trust_pickle: bool = False,
    fill_from: Mapping[str, torch.Tensor] | str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Import one checkpoint to ``destination`` (``.safetensors``, manifest in its header); return the manifest.

    Args:
        source: a ``.pt``/``.bin``/pickle file, a ``.safetensors`` file, or a Hugging Face model
            folder (with ``model.safetensors`` or ``pytorch_model.bin``).
        backbone: the registered backbone the weights belong to (keys and shapes are checked).
        format: ``"open_clip"`` (any prefix before ``visual.``), ``"hf"`` (transformers' CLIP
            names) or ``"auto"`` (HF when ``vision_model.*`` names are present).
        trust_pickle: allow unpickling whole objects (see the module's safety rule).
        fill_from: pretrained state (dict or ``.safetensors`` path) to take keys the checkpoint
            lacks from, e.g. ``visual.proj`` of a ``CLIPVisionModel``; listed in ``filled_keys``.
        overwrite: replace ``destination`` even if mergelib did not write it (never the source).

    The destination is checked first (not the source or ``fill_from``, compared as files; no
    file mergelib did not write unless ``overwrite``; a writable folder); the source is read and
    checked completely before anything is written; the file is written atomically, so a failed
    or interrupted import leaves no partial file behind.
    """
    destination = Path(destination)
    _check_destination(destination)
    weights = _weights_file(Path(source))
    inputs = [Path(source), weights] + ([Path(fill_from)] if isinstance(fill_from, (str, Path)) else [])
    check_not_an_input(destination, inputs, what="destination")
    check_replaceable(destination, overwrite=overwrite)
    check_writable(destination)
    converted = convert_checkpoint(source, backbone=backbone, format=format, trust_pickle=trust_pickle, fill_from=fill_from)
    source_sha = sha256_file(weights)
    parameters = {
        "source": str(weights.resolve()),
        "source_sha256": source_sha,
        "source_format": converted.source_format,
        "backbone": backbone,
        "fill_from": converted.fill_from,
    }
    manifest = {
        "kind": "imported_checkpoint",
        **parameters,
        "importer_version": IMPORTER_VERSION,
        "container": converted.container,
        "filled_keys": converted.filled_keys,
        "dropped_keys": len(converted.dropped_keys),
        "dropped_key_examples": converted.dropped_keys[:8],
        "cast_from_dtypes": converted.cast,
        "key": import_key(source_sha, backbone),
        "provenance": provenance(parameters),
    }
    return save_state(destination, converted.state, manifest, overwrite=overwrite)


def import_key(source_sha256: str, backbone: str) -> str:
    """The manifest ``key`` of an import: what determines the written weights."""
    return config_hash({"importer": IMPORTER_VERSION, "source_sha256": source_sha256, "backbone": backbone})


def imported_manifest(destination: str | Path, source: str | Path, backbone: str) -> dict[str, Any] | None:
    """The manifest of ``destination`` if it is a complete import of ``source`` (same source hash)
    for ``backbone``, else None (missing, partial, stale, or written by an older mergelib).

    Checks the key in the header and the hash of the tensor data (no tensors are loaded).
    """
    weights = _weights_file(Path(source))
    try:
        return verify_checkpoint(Path(destination), key=import_key(sha256_file(weights), backbone))
    except (CorruptCheckpointError, FileNotFoundError):
        return None


def is_imported(destination: str | Path, source: str | Path, backbone: str) -> bool:
    """Whether ``destination`` is a complete import of ``source`` for ``backbone`` (see :func:`imported_manifest`)."""
    return imported_manifest(destination, source, backbone) is not None


def load_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest in a checkpoint's header (no weights are read, nothing is hashed): see
    :func:`mergelib.io.checkpoints.read_manifest`. :class:`~mergelib.errors.CorruptCheckpointError` names the file
    when it is unreadable or carries no mergelib provenance (an import of an older mergelib
    version, with a ``.json`` beside it, is reported as such: import it again)."""
    return read_manifest(Path(path))


# --------------------------------------------------------------------------------------------
# Directory import (tall_masks / task_vectors layouts)
# --------------------------------------------------------------------------------------------

FINETUNED_NAMES = ("nonlinear_finetuned.pt", "finetuned.pt")
ZEROSHOT_NAMES = ("nonlinear_zeroshot.pt", "zeroshot.pt")
ZEROSHOT_TASK = "MNIST"  # the released code takes θ₀ from MNISTVal/nonlinear_zeroshot.pt


@dataclass(frozen=True)
class ImportedFile:
    """One file of :func:`import_directory`: ``imported`` is False when it was already there."""

    name: str
    source: Path
    destination: Path
    imported: bool
    manifest: dict[str, Any]


def task_name(folder: str) -> str:
    """``MNISTVal`` → ``MNIST`` (the released code's folders carry the split as suffix)."""
    return folder[: -len("Val")] if folder.endswith("Val") and len(folder) > 3 else folder


def _model_folder(root: Path, name: str) -> Path:
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        if child.is_dir() and child.name.lower() == name.lower():  # the HF mirror spells "VIT-B-16"
            return child
    if root.is_dir() and any((child / f).is_file() for child in root.iterdir() if child.is_dir() for f in FINETUNED_NAMES):
        return root  # root is the model folder itself
    listing = sorted(p.name for p in root.iterdir())[:10] if root.is_dir() else "missing"
    raise FileNotFoundError(
        f"{root}: no folder {name!r} (case-insensitive) with task folders holding {FINETUNED_NAMES[0]} "
        f"(expected {{root}}/{name}/{{Task}}Val/{FINETUNED_NAMES[0]}); found {listing}"
    )


def find_task_checkpoints(root: str | Path, model: str) -> tuple[dict[str, Path], Path | None]:
    """``({task: fine-tuned file}, zero-shot file or None)`` in the tall_masks / task_vectors layout."""
    folder = _model_folder(Path(root), model)
    tasks: dict[str, Path] = {}
    zeroshots: dict[str, Path] = {}
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        task = task_name(child.name)
        for name in FINETUNED_NAMES:
            if (child / name).is_file():
                tasks[task] = child / name
                break
        for name in ZEROSHOT_NAMES:
            if (child / name).is_file():
                zeroshots[task] = child / name
                break
    if (folder / "zeroshot.pt").is_file():
        zeroshot: Path | None = folder / "zeroshot.pt"
    else:
        zeroshot = zeroshots.get(ZEROSHOT_TASK) or next(iter(zeroshots.values()), None)
    return tasks, zeroshot


def import_directory(
    root: str | Path,
    destination: str | Path,
    *,
    backbone: str,
    model: str | None = None,
    tasks: Iterable[str] | None = None,
    trust_pickle: bool = False,
    fill_from: Mapping[str, torch.Tensor] | str | Path | None = None,
    overwrite: bool = False,
) -> list[ImportedFile]:
    """Import a folder of the released checkpoints to ``{destination}/{backbone}/{task}.safetensors``.

    ``root`` holds ``{model}/{Task}Val/nonlinear_finetuned.pt`` (+ ``nonlinear_zeroshot.pt``), as in
    the tall_masks Drive folders and the ``nik-dim/tall_masks`` mirror's ``single_task/`` folder,
    or the task_vectors layout ``{model}/{Task}/finetuned.pt`` + ``{model}/zeroshot.pt``; ``model``
    defaults to ``backbone`` and is matched case-insensitively; ``root`` may also be the model
    folder itself. The zero-shot encoder goes to ``zeroshot.safetensors``. ``tasks`` restricts the
    import to these task names (folder names without ``Val``).

    Idempotent: a file whose destination already records the same source hash (and is intact) is
    skipped, so rerunning after an interruption imports only what is missing.
    """
    found, zeroshot = find_task_checkpoints(root, model or backbone)
    if tasks is not None:
        wanted = list(tasks)
        unknown = [t for t in wanted if t not in found]
        if unknown:
            raise ParameterValueError(f"tasks {unknown} not found under {root}; available: {sorted(found)}")
        found = {t: found[t] for t in wanted}
    if not found and zeroshot is None:
        raise FileNotFoundError(
            f"{root}: no checkpoints found for model {model or backbone!r}; expected the layout "
            f"{{root}}/{model or backbone}/{{Task}}Val/{FINETUNED_NAMES[0]} (tall_masks) or "
            f"{{root}}/{model or backbone}/{{Task}}/{FINETUNED_NAMES[1]} (task_vectors); to import one file, give the file")
    jobs = list(found.items()) + ([("zeroshot", zeroshot)] if zeroshot is not None else [])
    out_dir = Path(destination) / backbone
    results = []
    for name, source in jobs:
        target = out_dir / f"{name}.safetensors"
        done = imported_manifest(target, source, backbone)
        if done is not None:
            results.append(ImportedFile(name, source, target, False, done))
            print(f"[mergelib] {target} already imported from {source}", file=sys.stderr, flush=True)
            continue
        manifest = import_checkpoint(source, target, backbone=backbone, trust_pickle=trust_pickle, fill_from=fill_from,
                                     overwrite=overwrite)
        results.append(ImportedFile(name, source, target, True, manifest))
        print(f"[mergelib] imported {source} -> {target}", file=sys.stderr, flush=True)
    return results


def load_imported(path: str | Path, backbone: str) -> tuple[StateDict, dict[str, Any]]:
    """Load an imported checkpoint (safetensors only, hash-verified) and check it fits ``backbone``.

    Returns ``(visual.* state, manifest)``. Never unpickles.
    """
    state, manifest = load_state(Path(path))
    recorded = manifest.get("backbone")
    if recorded is not None and recorded != backbone:
        raise CheckpointMismatchError(f"{path} was imported for backbone {recorded!r}, not {backbone!r}")
    check_architecture(state, backbone, source=path)
    return state, manifest


__all__ = [
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "ConvertedCheckpoint",
    "ImportedFile",
    "PickledStandIn",
    "ShimUnpickler",
    "UntrustedPickleError",
    "check_architecture",
    "convert_checkpoint",
    "expected_visual_shapes",
    "extract_tensors",
    "find_task_checkpoints",
    "hf_to_open_clip",
    "import_checkpoint",
    "import_directory",
    "import_pickled_checkpoint",
    "imported_manifest",
    "is_imported",
    "is_model_folder",
    "load_imported",
    "load_manifest",
    "looks_like_hf",
    "matching_backbones",
    "normalize_open_clip_keys",
    "open_clip_to_hf",
    "read_checkpoint",
    "task_name",
    "to_open_clip",
]
