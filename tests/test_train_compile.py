"""`train.compile`: the image encoder compiled in place, same weights and keys, same numbers
to float tolerance; eager runs keep the pretraining cache keys they had before the switch."""

import pytest
import torch

from fundus_lab import config as C
from fundus_lab import train as T
from fundus_lab.models.image import build_image_encoder

TINY = dict(img_size=32, patch_size=16, vision_width=32, vision_depth=1, vision_heads=2)


def test_compiled_encoder_keeps_its_state_dict_and_matches_eager():
    cfg = C.load_config(preset="smoke", overrides=[f"model.{k}={v}" for k, v in TINY.items()])
    torch.manual_seed(0)
    eager = build_image_encoder(cfg.model).eval()

    class Holder(torch.nn.Module):
        def __init__(self, enc):
            super().__init__()
            self.image_encoder = enc

    compiled = Holder(build_image_encoder(cfg.model).eval())
    compiled.image_encoder.load_state_dict(eager.state_dict())
    keys = list(compiled.state_dict())
    T.compile_model(compiled, cfg.train)  # compile off: untouched
    assert compiled.image_encoder._compiled_call_impl is None
    cfg.train.compile = True
    T.compile_model(compiled, cfg.train)
    assert compiled.image_encoder._compiled_call_impl is not None
    assert list(compiled.state_dict()) == keys  # checkpoints load into eager models unchanged
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want, got = eager(x), compiled.image_encoder(x)
    for a, b in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got)):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_compile_is_in_the_pretraining_key_only_when_on():
    from fundus_lab.experiment.pretraining import _pretrain_inputs

    cfg = C.load_config(preset="smoke")
    assert "compile" not in _pretrain_inputs(cfg)["train"]  # eager: the key it always had
    cfg.train.compile = True
    assert _pretrain_inputs(cfg)["train"]["compile"] is True  # compiled: its own cache entry
