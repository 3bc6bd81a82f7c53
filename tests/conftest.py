"""Fixtures shared by several test modules. Each name says what it holds."""

from __future__ import annotations

from typing import Any

import pytest

# The words of the tiny SD1 vocabulary of the pipeline and image-to-image tests' prompts ("red circle", "ugly").
SD1_WORDS = ["red", "circle", "blue", "square", "ugly"]


@pytest.fixture(scope="module")
def sd1_with_controlnets() -> tuple[Any, dict[str, Any], list[Any]]:
    """(our Pipeline, the tiny seeded SD1 components it holds, two ControlNets from its UNet with seeded
    trained-like weights (seeds 10 and 11)): the models every diffusers-agreement test of a module shares."""
    from controlnet.model import ControlNet
    from controlnet.pipeline import Pipeline
    from controlnet.testing import tiny_components, trained_like

    comps = tiny_components(SD1_WORDS)
    cns = [trained_like(ControlNet.from_unet(comps["unet"]), seed) for seed in (10, 11)]
    return Pipeline(**comps, dtype="fp32", device="cpu"), comps, cns
