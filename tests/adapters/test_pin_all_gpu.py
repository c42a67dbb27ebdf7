"""`pin_all`: an adapter's tensors as views of one page-locked buffer (needs CUDA for pinning)."""

from __future__ import annotations

import pytest
import torch

from adapters.loader import pin_all

pytestmark = pytest.mark.gpu


def test_pinned_views_hold_the_same_values_in_one_buffer() -> None:
    gen = torch.Generator().manual_seed(0)
    modules = {(layer, name): (torch.randn(4, 32, generator=gen).bfloat16(), torch.randn(48, 4, generator=gen).bfloat16())
               for layer in range(3) for name in ("q_proj", "v_proj")}
    pinned = pin_all(modules)
    assert pinned.keys() == modules.keys()
    storages = set()
    for key, (a, b) in pinned.items():
        assert a.is_pinned() and b.is_pinned()
        assert torch.equal(a, modules[key][0]) and torch.equal(b, modules[key][1])
        storages.add(a.untyped_storage().data_ptr())
        storages.add(b.untyped_storage().data_ptr())
    assert len(storages) == 1, "one host allocation for the whole adapter"
    # The views copy to the device like any pinned tensor.
    a, _ = pinned[(2, "v_proj")]
    assert torch.equal(a.to("cuda", non_blocking=True).cpu(), modules[(2, "v_proj")][0])
