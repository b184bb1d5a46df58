"""Mixture-of-experts parity beyond what every InternVL configuration is held to
(tests/test_internvl_parity.py runs all its tests on both MoE checkpoints): the routers match the
reference exactly, layer by layer."""

from __future__ import annotations

import pytest
from hooked_vlm import HookedVLM
from hooked_vlm.parity import check_parity

PROMPTS = ["What is in the image?", "Please provide the bounding box coordinate of the woman."]


@pytest.mark.parametrize("name", ["internvl_moe", "internvl_moe_top1"])
def test_router_logits_weights_and_mlp_outputs_equal_the_reference(tiny_checkpoint, photos, name):
    directory = tiny_checkpoint(name)
    hooked = HookedVLM.from_pretrained(directory)
    images = [photos["chelsea"], photos["grace_hopper_tall"]]  # several tiles each, batch of 2
    report = check_parity(directory, images, PROMPTS, max_new_tokens=0, verbose=False, hooked=hooked)
    rows = report.to_dataframe(by="activation").set_index("name")
    moe_layers = [l for l in range(hooked.cfg.n_layers) if hooked.cfg.is_moe_layer(l)]
    for kind in ("hook_router_logits", "hook_router_weights"):
        names = [f"blocks.{l}.mlp.{kind}" for l in moe_layers]
        assert (rows.loc[names, "max_abs"] == 0).all(), str(report)  # equal, not merely close
    mlp_out = [f"blocks.{l}.hook_mlp_out" for l in range(hooked.cfg.n_layers)]
    assert (rows.loc[mlp_out, "max_abs"] == 0).all(), str(report)
