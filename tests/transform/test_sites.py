"""transform.sites: site names, shapes, FLOPs shares and the description table."""

from __future__ import annotations

import pytest

from ptq_adversary import transform
from tests.transform.nets import linen


def test_linen_sites_names_and_description():
    module, variables, x = linen()
    qfn = transform.quantize(module.apply, variables, x)
    assert qfn.num_sites == 3
    assert qfn.site_names == ("conv2", "conv3", "head")
    assert [s.op for s in qfn.sites] == ["conv", "conv", "dense"]
    assert qfn.sites[0].data_shape == (1, 8, 8, 8)
    assert qfn.sites[0].weight_shape == (3, 3, 8, 8)
    assert qfn.sites[2].out_shape == (1, 10)
    # FLOPs shares of the sites plus the first conv add up to 1
    first = 2 * 8 * 8 * 8 * 9 * 1
    total = first + sum(s.flops for s in qfn.sites)
    assert qfn.sites[0].flops == 2 * 4 * 4 * 8 * 9 * 8
    assert sum(s.flops_share for s in qfn.sites) == pytest.approx(1 - first / total)
    assert "conv2" in qfn.describe() and "FLOPs" in qfn.describe()
