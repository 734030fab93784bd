"""DeepSpeed's gradient clipping and accumulation come from the protodepth config (issue 14 item 3), whatever the
Accelerate config file says. No launch: the plugin's config dict is read the way DeepSpeed reads it."""
import pytest

from trainer_utils import tiny_config

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")


@pytest.mark.parametrize("clip,accum", [(0.0, 2), (0.5, 1)])
def test_deepspeed_clipping_and_accumulation_follow_the_config(tmp_path, monkeypatch, clip, accum):
    from deepspeed.runtime.config import get_gradient_clipping

    from protodepth.training.accel import deepspeed_plugin

    # what `accelerate launch` exports from a YAML that still hard-codes them
    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", "1.0")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    cfg = tiny_config(tmp_path, **{"optim.grad_clip": clip, "train.grad_accum": accum})
    ds = deepspeed_plugin(cfg).deepspeed_config
    # DeepSpeed 0.19 clips at 1.0 when the key is absent: optim.grad_clip=0 must be written out as 0.0
    assert get_gradient_clipping(ds) == clip
    assert ds["gradient_accumulation_steps"] == accum
