"""Speed and memory benchmarks: our ControlNet code against diffusers, same weights, same settings.

Entry point: ``python -m benchmarks.run [--quick] [--json PATH]`` (see :mod:`benchmarks.run`). The cases
themselves (models, the calls each implementation makes) live in :mod:`benchmarks.cases`; the training cases
in :mod:`benchmarks.training`.
"""
