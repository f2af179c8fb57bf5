"""Prompt templates of SCORE's zero-shot heads (arXiv 2603.05768), as ``"...{}..."`` format strings.

Every template holds exactly one ``{}`` for the class name, the form
:func:`mergelib.models.heads.zero_shot_head` fills with ``template.format(name)``. Which dataset uses
which list follows the released code (``src/datasets/templates.py`` of
``VirtualSpaceman/score_cvpr26``):

* DomainNet, ImageNet-R, Office-Home, NICO++: the 80 OpenAI ImageNet templates, taken from
  open_clip (``open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES``, same text and order) rather
  than retyped.
* PACS: the 2 templates the released code calls its SUN397/STL-10 list.
* TerraIncognita: 38 of the 80, in ImageNet order. The released list is written out by hand; it is
  exactly the ImageNet templates that contain the word "photo" except the five in
  :data:`_TERRA_INCOGNITA_LEFT_OUT` (checked against the released file, template by template).
* FedISIC: 2 dermoscopy templates.
* RetinaDomains: 4 fundus templates, with no final period (as released).
"""

from __future__ import annotations

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

__all__ = [
    "IMAGENET_TEMPLATES", "PACS_TEMPLATES", "TERRA_INCOGNITA_TEMPLATES", "FEDISIC_TEMPLATES",
    "RETINA_TEMPLATES", "DG_TEMPLATES",
]

# open_clip stores each template as ``lambda c: f"... {c} ..."``; calling it with "{}" gives the
# format string back.
IMAGENET_TEMPLATES: tuple[str, ...] = tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)

PACS_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a photo of the {}.")

# The "photo" templates that the released TerraIncognita list does not keep.
_TERRA_INCOGNITA_LEFT_OUT = frozenset({
    "a photo of my {}.", "a photo of the cool {}.", "a pixelated photo of a {}.",
    "a photo of a cool {}.", "a photo of a small {}.",
})
TERRA_INCOGNITA_TEMPLATES: tuple[str, ...] = tuple(
    t for t in IMAGENET_TEMPLATES if "photo" in t and t not in _TERRA_INCOGNITA_LEFT_OUT
)

FEDISIC_TEMPLATES: tuple[str, ...] = ("This is dermatoscopy of {}.", "This is dermoscopy of {}.")

RETINA_TEMPLATES: tuple[str, ...] = (
    "a fundus image with {}",
    "a retina photograph showing {}",
    "retinal scan indicating {}",
    "an eye fundus with {}",
)

DG_TEMPLATES: dict[str, tuple[str, ...]] = {
    "PACS": PACS_TEMPLATES,
    "DomainNet": IMAGENET_TEMPLATES,
    "ImageNetR": IMAGENET_TEMPLATES,
    "NICOpp": IMAGENET_TEMPLATES,
    "OfficeHome": IMAGENET_TEMPLATES,
    "TerraIncognita": TERRA_INCOGNITA_TEMPLATES,
    "FedISIC": FEDISIC_TEMPLATES,
    "RetinaDomains": RETINA_TEMPLATES,
}
