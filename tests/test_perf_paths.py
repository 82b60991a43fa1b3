"""The speed paths of issue 20: fused AdamW (same update as the for-loop one), every
training attention on ``F.scaled_dot_product_attention``, the GPU-only switches built on
a CPU (loader options, channels_last CNN towers, autocast dtype), and the benchmark's
matmul-rate and MFU helpers."""

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fundus_lab import train as T
from fundus_lab.config import TrainConfig
from fundus_lab.optim import build_optimizer, build_scheduler
from fundus_lab.models import ModelConfig
from fundus_lab.models.image import ConvNetTower, build_image_encoder
from fundus_lab.sampling import loader_options

sys.path.insert(0, str(Path(__file__).parent))
from doubles import batch, tiny_model  # noqa: E402


def _throughput_module():
    path = Path(__file__).parents[1] / "benchmarks" / "train_throughput.py"
    spec = importlib.util.spec_from_file_location("train_throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ fused AdamW


@pytest.mark.parametrize("device, fused", [("cpu", True), ("cuda", True), (torch.device("cpu"), True),
                                           (None, False), ("meta", False)])
def test_adamw_is_fused_where_torch_has_the_kernel(tokenizer, device, fused):
    model = tiny_model("clip", tokenizer)
    optimizer = build_optimizer(model, TrainConfig(), device)
    assert all(bool(g.get("fused")) is fused for g in optimizer.param_groups)


def test_fused_adamw_takes_the_same_steps_as_the_for_loop_one(tokenizer):
    """Five AdamW steps from the same gradients (weight decay, bias correction, both groups):
    the fused kernel lands where the for-loop implementation does, to float32 rounding."""
    weights = {}
    for device in (None, "cpu"):  # None: the for-loop implementation the trainer used before
        model = tiny_model("clip", tokenizer, seed=3)
        optimizer = build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.05), device)
        g = torch.Generator().manual_seed(0)
        for _ in range(5):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g) * 1e-2
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        weights[device] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start = tiny_model("clip", tokenizer, seed=3).state_dict()
    loop, fused = weights[None], weights["cpu"]
    assert sum(not torch.equal(loop[k], start[k]) for k in loop) > 10
    for key in loop:
        torch.testing.assert_close(fused[key], loop[key], rtol=1e-6, atol=1e-7, msg=key)


def test_train_step_reports_the_same_loss_with_the_fused_optimizer(tokenizer):
    """The trainer's own step (forward, checks, clipping, AdamW, schedule): the same logged
    losses over three steps with either optimizer implementation."""
    from accelerate import Accelerator

    train = TrainConfig(steps=3, lr=1e-3, warmup_steps=1)
    logs = {}
    for device in (None, "cpu"):
        model = tiny_model("ours", tokenizer, seed=1).train()
        optimizer = build_optimizer(model, train, device)
        scheduler = build_scheduler(optimizer, train)
        batches = iter([batch(0), batch(1), batch(2)])
        torch.manual_seed(0)
        logs[device] = [T.train_step(Accelerator(cpu=True), model, optimizer, scheduler, batches, train, s + 1)[0][0]
                        for s in range(3)]
    for before, after in zip(logs[None], logs["cpu"]):
        assert before.keys() == after.keys()
        for key in before:
            assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-6), key


# ------------------------------------------------------------------ attention


class _AttentionCalls(TorchFunctionMode):
    """Counts F.scaled_dot_product_attention calls and softmaxes (an attention map made explicitly)."""

    def __init__(self):
        super().__init__()
        self.sdpa, self.softmax = 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.sdpa += 1
        elif func is F.multi_head_attention_forward:
            # nn.MultiheadAttention: torch runs SDPA inside exactly when no weights are asked
            # for (the mode does not see calls made inside a handled function)
            need_weights = (kwargs or {}).get("need_weights", True)
            self.sdpa += not need_weights
            self.softmax += bool(need_weights)
        elif func in (F.softmax, torch.softmax, torch.Tensor.softmax):
            self.softmax += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["clip", "coca", "ours", "ours-flip"])
def test_every_training_attention_is_fused_sdpa(tokenizer, method):
    """A training step computes no attention map of its own: every self- and
    cross-attention (ViT, BERT, fusion, CoCa poolers and cross-attention, decoders) goes
    through F.scaled_dot_product_attention, which never returns the weights."""
    model = tiny_model(method, tokenizer).train()
    calls = _AttentionCalls()
    with calls:
        model(batch())["loss"].backward()
    attention_modules = sum(isinstance(m, torch.nn.MultiheadAttention) or type(m).__name__ in ("Attention", "BertSelfAttention")
                            for m in model.modules())
    assert calls.softmax == 0
    assert calls.sdpa >= attention_modules > 0


def test_cross_attention_maps_still_return_weights_when_asked(tokenizer):
    model = tiny_model("ours", tokenizer).eval()
    out = model.cross_attention_maps(batch()["image"], batch()["text"])
    assert out["maps"] and out["maps"][0].ndim == 4
    torch.testing.assert_close(out["maps"][0].sum(-1), torch.ones_like(out["maps"][0].sum(-1)))


# ------------------------------------------------------------------ GPU-only switches, built on a CPU


@pytest.mark.parametrize("device, workers, expected", [
    ("cpu", 2, {"num_workers": 2, "pin_memory": False, "persistent_workers": False}),
    ("cuda", 2, {"num_workers": 2, "pin_memory": True, "persistent_workers": True}),
    ("cuda", 0, {"num_workers": 0, "pin_memory": True, "persistent_workers": False}),
])
def test_loader_pins_memory_and_keeps_workers_on_a_gpu(device, workers, expected):
    assert loader_options(workers, device) == expected


def test_channels_last_cnn_tower_on_a_gpu_gives_the_same_features():
    """The GPU switch applied on a CPU: the ResNet's weights and input go NHWC, the features
    do not change (beyond float rounding); for a CPU device nothing changes."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.image_encoder = build_image_encoder(ModelConfig(img_size=64, image_encoder="resnet18"), load_weights=False).eval()
    assert isinstance(model.image_encoder, ConvNetTower)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        before = model.image_encoder(images)["tokens"]
        T.channels_last_for(model, "cpu")
        assert not model.image_encoder.channels_last
        T.channels_last_for(model, "cuda")
        assert model.image_encoder.channels_last
        after = model.image_encoder(images)["tokens"]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_vit_tower_is_left_alone_by_channels_last(tokenizer):
    model = tiny_model("clip", tokenizer)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    T.channels_last_for(model, "cuda")
    assert all(v.is_contiguous() and torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_autocast_is_bf16_on_a_bf16_gpu_and_off_on_a_cpu(monkeypatch):
    assert T.resolve_mixed_precision("auto") in ("no", "bf16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert T.resolve_mixed_precision("auto") == "no"
    assert T.resolve_mixed_precision("bf16") == "bf16"  # a CPU can autocast to bf16 when asked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert T.resolve_mixed_precision("auto") == "bf16"


# ------------------------------------------------------------------ benchmark helpers


def test_gpu_peak_by_name_and_override():
    tt = _throughput_module()
    assert tt.gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert tt.gpu_peak_flops("NVIDIA L40S") == 362e12  # the longest name that matches, not "L4"
    assert tt.gpu_peak_flops("Some Future GPU") is None
    assert tt.gpu_peak_flops("NVIDIA H100 80GB HBM3", 500.0) == 500e12
    with pytest.raises(SystemExit, match="--peak -1"):
        tt.gpu_peak_flops("NVIDIA H100", -1)


def test_cuda_device_without_a_gpu_is_a_clear_error(monkeypatch):
    tt = _throughput_module()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tt.resolve_device("auto") == "cpu"
    with pytest.raises(SystemExit, match="--device cuda: no CUDA GPU"):
        tt.resolve_device("cuda")
    with pytest.raises(SystemExit, match="expected auto, cpu or cuda"):
        tt.resolve_device("tpu")


def test_matmul_rate_and_share_of_it():
    tt = _throughput_module()
    shapes = tt.matmul_shapes("smoke", [])
    assert "2048^3" in shapes and len(shapes) == 3
    m, k, n = next(iter(shapes.values()))
    assert k * 4 == n  # tokens x width x mlp width
    rates = tt.matmul_rate({"a": (64, 32, 128), "2048^3": (128, 128, 128)}, seconds=0.05)
    assert all(r > 0 for r in rates.values())
    results = [{"achieved_tflops": 0.05}, {"error": "x"}]
    tt.with_matmul_share(results, {"a": 100.0, "b": 300.0, "2048^3": 250.0})
    assert results[0]["gflops_per_s"] == pytest.approx(50.0)
    assert results[0]["pct_model_matmul"] == pytest.approx(25.0)  # of the mean of the model's shapes
    assert results[0]["pct_square_matmul"] == pytest.approx(20.0)
    assert "gflops_per_s" not in results[1]


def test_throughput_rounds_take_the_median_round_and_pair_ratios_within_a_round():
    bench = _throughput_module()
    run = lambda method, speed: {"method": method, "images_per_s": speed}
    rounds = [{"clip": run("clip", 40.0), "open_clip:clip": run("open_clip:clip", 50.0)},  # a fast moment
              {"clip": run("clip", 20.0), "open_clip:clip": run("open_clip:clip", 20.0)},  # a slow one
              {"clip": run("clip", 30.0), "open_clip:clip": run("open_clip:clip", 24.0)}]
    assert bench.paired_ratios(rounds, "open_clip:clip") == [1.25, 1.0, 0.8]
    median = bench.median_round("clip", [r["clip"] for r in rounds])
    assert median["images_per_s"] == 30.0 and median["rounds_images_per_s"] == [40.0, 20.0, 30.0]
    assert bench.median_round("clip", [run("clip", 1.0), run("clip", 3.0)])["images_per_s"] == 1.0  # lower middle
    assert "error" in bench.median_round("clip", [run("clip", 1.0), {"method": "clip", "error": "boom"}])
    text = bench.rounds_table(["clip", "open_clip:clip"], rounds)
    assert "1.25 1.00 0.80" in text and text.splitlines()[2].endswith("1.00x")
