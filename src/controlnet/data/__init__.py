"""Training data: manifests and datasets (:mod:`.datasets`), on-disk caches of what the locked models compute
(:mod:`.cache`), and the synthetic fill data (:mod:`.fill`).

Import the submodules directly (``from controlnet.data.datasets import read_manifest``); this package imports
nothing itself, so ``import controlnet.data`` stays cheap.
"""
