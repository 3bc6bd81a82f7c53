"""Residuals keyed by location: sums of several branches, per-residual scales, and the hand-over to a UNet."""

from __future__ import annotations

import pytest
import torch

from controlnet.testing import build_unet
from controlnet.model import ControlNet
from controlnet.residuals import Residuals


def _random(seed: int, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


SHAPES = [(2, 4, 8, 8), (2, 4, 8, 8), (2, 8, 4, 4)]


def test_sum_adds_location_by_location_and_keeps_the_others():
    a = Residuals.for_unet(_random(0, SHAPES[:2]), _random(1, SHAPES[2:])[0])
    b = Residuals.for_unet(_random(2, SHAPES[:2]), _random(3, SHAPES[2:])[0])
    total = a + b
    assert total.locations() == [("down", 0), ("down", 1), ("mid", 0)]
    assert all(torch.equal(t, x + y) for t, x, y in zip(total, a, b))
    # Nothing plus a branch is that branch's tensors themselves (no arithmetic, no copy).
    assert all(t is x for t, x in zip(Residuals() + a, a))
    assert Residuals().unet_kwargs() == {}
    # Another kind (a T2I-Adapter's features inside the down blocks) is kept beside a ControlNet's.
    adapter = Residuals({("down_intrablock", i): t for i, t in enumerate(_random(4, SHAPES[:2]))})
    both = a + adapter
    assert both.locations() == a.locations() + adapter.locations()
    assert all(x is y for x, y in zip(both.of_kind("down_intrablock"), adapter))
    # Two branches with different numbers of the same kind do not fit one base.
    with pytest.raises(ValueError, match="one has 2 'down' locations, the other 1"):
        a + Residuals.for_unet(_random(5, SHAPES[:1]))


def test_scaled_per_residual_in_the_order_the_base_meets_them():
    a = Residuals.for_unet(_random(0, SHAPES[:2]), _random(1, SHAPES[2:])[0])
    assert a.scaled(1.0) is a and a.scaled([1.0, 1.0, 1.0]) is a
    scaled = a.scaled([0.5, 2.0, 0.25])
    assert [torch.equal(t, x * s) for t, x, s in zip(scaled, a, [0.5, 2.0, 0.25])] == [True] * 3
    assert all(torch.equal(t, x * 3.0) for t, x in zip(a.scaled(3), a))
    with pytest.raises(ValueError, match="2 scales given for 3 residuals"):
        a.scaled([1.0, 2.0])


def test_unet_kwargs_give_the_unet_what_its_own_arguments_give():
    """The UNet under a ControlNet's Residuals equals the UNet given the same tensors by argument; adapter
    features inside the down blocks go to down_intrablock_additional_residuals, a fresh list per call (the UNet
    consumes it); kinds a UNet has no place for are refused."""
    unet = build_unet("sd1", seed=0).eval()
    cn = ControlNet.from_unet(unet)
    torch.manual_seed(0)
    for conv in cn.zero_convs():
        torch.nn.init.normal_(conv.weight, std=0.1)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    text = torch.randn(1, 5, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        res = cn(x, t, text, torch.rand(1, 3, 64, 64, generator=g))
        expected = unet(x, t, text, down_block_additional_residuals=list(res.down),
                        mid_block_additional_residual=res.mid).sample
        assert torch.equal(unet(x, t, text, **res.unet_kwargs()).sample, expected)
        widths = unet.config.block_out_channels
        features = [torch.randn(1, w, 8 >> i, 8 >> i, generator=g) for i, w in enumerate(widths)]
        adapter = Residuals({("down_intrablock", i): f for i, f in enumerate(features)})
        both = res + adapter
        direct = unet(x, t, text, down_block_additional_residuals=list(res.down), mid_block_additional_residual=res.mid,
                      down_intrablock_additional_residuals=list(features)).sample
        kwargs = both.unet_kwargs()
        assert torch.equal(unet(x, t, text, **kwargs).sample, direct)
        assert len(kwargs["down_intrablock_additional_residuals"]) == 0  # consumed by that call
        assert torch.equal(unet(x, t, text, **both.unet_kwargs()).sample, direct)
        assert not torch.equal(direct, expected)
    with pytest.raises(ValueError, match=r"\['single'\] locations have no place in a UNet"):
        (res + Residuals({("single", 0): res.mid})).unet_kwargs()
