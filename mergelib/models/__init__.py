"""The CLIP models: open_clip backbones (:mod:`.backbones`, the embedded tiny configuration in
``model_configs/``), zero-shot heads (:mod:`.heads`), contrastive pretraining of the miniature
(:mod:`.pretrain`), fine-tuning (:mod:`.finetune`), evaluation (:mod:`.evaluation`), the layer
inputs and essential subspaces that ESM needs (:mod:`.essential`) and importers of other
checkpoint formats (:mod:`.importers`).

Imports :mod:`mergelib.methods`, :mod:`mergelib.io` and :mod:`mergelib.data`, never the
analyses, protocols or experiments.
"""
