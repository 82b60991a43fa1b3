"""Training throughput and peak memory of one optimizer step, every method side by side.

    python benchmarks/train_throughput.py                       # default preset, all methods
    python benchmarks/train_throughput.py --preset smoke --steps 3 --methods clip,ours,mae
    python benchmarks/train_throughput.py --preset paper train.batch_size=64   # on a GPU
    python benchmarks/train_throughput.py --methods clip,coca,ours-flip,open_clip:clip,open_clip:coca
    python benchmarks/train_throughput.py --methods clip,ours,ours+compile --warmup 2 --steps 20   # torch.compile

With ``open_clip`` installed (``pip install -e .[bench]``) the run adds open_clip's own
CLIP and CoCa (``open_clip:clip``, ``open_clip:coca``) built at the same sizes as ours
(towers, heads, context length = the batch's token length, caption loss weight 2) and
trained on the same batch with open_clip's ``ClipLoss`` / ``CoCaLoss`` and AdamW, so the
library's methods can be read against the reference implementations.

Each method runs in its own subprocess (a fresh allocator and a clean peak-memory
high-water mark) through the trainer's own ``fundus_lab.train.train_step`` (forward,
backward, clipping, AdamW, schedule, after-step hook) on a fixed in-memory batch: random
images and the texts of the configured ``data.text_source`` (definitions of drawn
knowledge-base classes by default; knowledge-base sentences for ``report``), so disk and
JPEG/PNG decoding are left out and only the model's cost is compared.

The same run also measures the machine's own sustained matmul rate (fp32 on a CPU, bf16 on a
GPU) in a child of its own, before and after the methods: at the default model's shapes
(``tokens x width x mlp_width`` and back, ``tokens`` = the image tower's batch of tokens)
and at ``2048^3``. Each method's achieved GFLOP/s (forward + backward FLOPs / step time)
is printed with its percentage of each, the figure that says how much is left to win on
this machine. ``--device cuda`` also prints the model FLOPs utilisation against the GPU's
dense bf16 peak (:data:`GPU_PEAK_FLOPS` by device name, or ``--peak`` in TFLOP/s).

Reported per method: parameters, images/s over the timed steps, the ratio to ``clip``,
peak memory (GPU: ``torch.cuda.max_memory_allocated``, and its growth from before the first step;
CPU: the process's max RSS, and its growth from before the first step, i.e. activations +
gradients + AdamW state), forward+backward
GFLOPs per image counted with ``torch.utils.flop_counter.FlopCounterMode``
(``fundus_lab.budget.count_step_flops``, the count ``train.budget=flops`` sets steps from), and on a GPU
the model FLOPs utilisation against the device's dense bf16/fp16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# dense tensor-core peaks (FLOP/s) for bf16/fp16, by a substring of the device name
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                  "L4": 121e12, "RTX 4090": 165e12, "V100": 125e12, "T4": 65e12}


def matmul_shapes(preset: str, overrides: list[str]) -> dict[str, tuple[int, int, int]]:
    """``(m, k, n)`` of the matmuls that dominate the model at ``preset``: the image tower's
    tokens (batch x (1 + patches)) through the MLP (width -> mlp width and back), and a
    large square product as the machine's best case."""
    from fundus_lab.config import load_config

    cfg = load_config(preset=preset, method="clip", overrides=overrides)
    m = cfg.model
    tokens = cfg.train.batch_size * (1 + (m.img_size // m.patch_size) ** 2)
    hidden = int(m.vision_width * m.mlp_ratio)
    return {f"{tokens}x{m.vision_width}x{hidden}": (tokens, m.vision_width, hidden),
            f"{tokens}x{hidden}x{m.vision_width}": (tokens, hidden, m.vision_width),
            "2048^3": (2048, 2048, 2048)}


def matmul_rate(shapes: dict[str, tuple[int, int, int]], device: str = "cpu", seconds: float = 1.0) -> dict[str, float]:
    """Sustained matmul rate in GFLOP/s per shape (fp32 on a CPU, bf16 on a GPU): the best
    of five windows of about ``seconds / 5`` each, after one untimed product."""
    import torch

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rates = {}
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        out = torch.empty(m, n, device=device, dtype=dtype)
        torch.mm(a, b, out=out)
        sync()
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        reps = max(1, int(seconds / 5 / max(time.perf_counter() - start, 1e-6)))
        best = 0.0
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=out)
            sync()
            best = max(best, 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9)
        rates[name] = best
    return rates


def _max_rss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def gpu_peak_flops(device_name: str, peak_tflops: float | None = None) -> float | None:
    """Dense bf16 peak in FLOP/s: ``--peak`` (TFLOP/s) when given, else :data:`GPU_PEAK_FLOPS`
    by the longest key found in the device name (None for an unknown GPU)."""
    if peak_tflops is not None:
        if peak_tflops <= 0:
            raise SystemExit(f"--peak {peak_tflops}: expected the GPU's dense bf16 peak in TFLOP/s, > 0")
        return peak_tflops * 1e12
    matches = [k for k in GPU_PEAK_FLOPS if k in device_name]
    return GPU_PEAK_FLOPS[max(matches, key=len)] if matches else None


def resolve_device(choice: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without one is an error."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch")
    if choice not in ("cpu", "cuda"):
        raise SystemExit(f"--device {choice!r}: expected auto, cpu or cuda")
    return choice


def measure(preset: str, method: str, steps: int, warmup: int, overrides: list[str], device: str = "auto",
            peak_tflops: float | None = None) -> dict:
    """Build ``method`` at ``preset`` and time ``steps`` optimizer steps after ``warmup``."""
    import torch
    from accelerate import Accelerator

    from fundus_lab import optim
    from fundus_lab import train as T
    from fundus_lab.budget import count_step_flops, example_batch
    from fundus_lab.config import load_config
    from fundus_lab.data.tokenizer import default_corpus, train_tokenizer
    from fundus_lab.models import build_model
    from fundus_lab.sampling import to_device

    name, _, variant = method.partition("+")
    if variant not in ("", "compile"):
        raise SystemExit(f"--methods: {method!r}: the only variant is '+compile' (train.compile=true)")
    cfg = load_config(preset=preset, method=name, overrides=[*overrides, *(["train.compile=true"] if variant else [])])
    torch.manual_seed(cfg.train.seed)
    accelerator = Accelerator(mixed_precision=T.resolve_mixed_precision(cfg.train.mixed_precision),
                              cpu=resolve_device(device) == "cpu")
    tokenizer = train_tokenizer(default_corpus(), vocab_size=cfg.model.vocab_size,
                                model_max_length=cfg.model.text_max_length)
    model = T.compile_model(build_model(cfg.model, cfg.method, tokenizer).train(), cfg.train)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = optim.build_optimizer(model, cfg.train, accelerator.device)
    scheduler = optim.build_scheduler(optimizer, cfg.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = to_device(example_batch(cfg, cfg.train.batch_size), accelerator.device)

    def forever():
        while True:
            yield batch

    data = forever()
    cuda = accelerator.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rss_before = _max_rss_mib()  # before the first step: optimizer state is allocated by it
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    warm_start = time.perf_counter()
    for i in range(warmup):  # with +compile this includes compiling
        T.train_step(accelerator, model, optimizer, scheduler, data, cfg.train, i + 1)
    sync()
    warmup_s = time.perf_counter() - warm_start
    start = time.perf_counter()
    for i in range(steps):
        T.train_step(accelerator, model, optimizer, scheduler, data, cfg.train, warmup + i + 1)
    sync()
    elapsed = time.perf_counter() - start
    images = steps * cfg.train.batch_size * cfg.train.grad_accum_steps
    if cuda:
        peak, peak_kind = torch.cuda.max_memory_allocated() / 2**20, "cuda max allocated"
        step_extra = peak - base
    else:
        # max RSS is a process high-water mark: its growth from before the first step is
        # what training adds (activations, gradients, AdamW moments); peak is the whole process
        peak, peak_kind = _max_rss_mib(), "max RSS"
        step_extra = peak - rss_before

    # FLOPs of one forward + backward (the optimizer's elementwise work is negligible): the
    # library's counter, the one train.budget=flops sets step counts with
    flops = count_step_flops(model, batch, backward=accelerator.backward)
    result = {
        "method": method, "preset": preset, "device": str(accelerator.device),
        "precision": accelerator.mixed_precision, "params_m": params / 1e6,
        "batch_size": cfg.train.batch_size, "img_size": cfg.model.img_size, "steps": steps,
        "step_s": elapsed / steps, "images_per_s": images / elapsed, "warmup_s": warmup_s,
        "peak_mem_mib": peak, "peak_kind": peak_kind, "step_extra_mib": step_extra,
        "gflops_per_image": flops / cfg.train.batch_size / 1e9,
        "achieved_tflops": flops * steps / elapsed / 1e12, "threads": torch.get_num_threads(),
        "optimizer": optimizer_kind(optimizer),
    }
    if cuda:
        name = torch.cuda.get_device_name()
        peak_flops = gpu_peak_flops(name, peak_tflops)
        result["gpu"] = name
        if peak_flops and accelerator.mixed_precision in ("bf16", "fp16"):
            result["mfu"] = flops * steps / elapsed / peak_flops
    return result


def build_open_clip(kind: str, cfg, tokenizer, context_length: int):
    """open_clip's ``CLIP`` or ``CoCa`` at our preset's sizes, and its loss."""
    import open_clip
    from open_clip.coca_model import MultimodalCfg
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    m = cfg.model
    vision = CLIPVisionCfg(layers=m.vision_depth, width=m.vision_width, head_width=m.vision_width // m.vision_heads,
                           mlp_ratio=m.mlp_ratio, patch_size=m.patch_size, image_size=m.img_size)
    text = dict(context_length=context_length, vocab_size=len(tokenizer), width=m.text_width, heads=m.text_heads,
                layers=m.text_depth, mlp_ratio=m.mlp_ratio, pad_id=tokenizer.pad_token_id)
    if kind == "clip":
        model = open_clip.CLIP(m.embed_dim, vision, CLIPTextCfg(**text), output_dict=True)
        return model, open_clip.ClipLoss()
    if kind == "coca":
        vision.attentional_pool = True
        vision.attn_pooler_queries = cfg.method.coca_pool_queries if cfg.method.caption_mode == "autoregressive" else 16
        # open_clip's poolers work at the embedding width: heads must divide it
        vision.attn_pooler_heads = next(h for h in (m.vision_heads, 8, 4, 2, 1) if m.embed_dim % h == 0)
        vision.output_tokens = True
        multimodal = MultimodalCfg(**{**text, "layers": m.caption_depth})
        # open_clip's multimodal layers attend to the pooled image tokens at the embedding
        # width, so its CoCa needs embed_dim == text width (as in its model configs)
        vision.attn_pooler_heads = next(h for h in (m.text_heads, 8, 4, 2, 1) if m.text_width % h == 0)
        model = open_clip.CoCa(m.text_width, multimodal, CLIPTextCfg(**{**text, "embed_cls": True, "output_tokens": True}),
                               vision, pad_id=tokenizer.pad_token_id)
        return model, open_clip.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=tokenizer.pad_token_id)
    raise ValueError(f"open_clip:{kind}: expected open_clip:clip or open_clip:coca")


def measure_open_clip(preset: str, kind: str, steps: int, warmup: int, overrides: list[str], device: str = "auto",
                      peak_tflops: float | None = None) -> dict:
    """open_clip's ``kind`` model at ``preset``'s sizes, timed like :func:`measure` (forward,
    loss, backward, clipping, AdamW) on the same batch, tokenised by our tokenizer."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fundus_lab.budget import example_batch
    from fundus_lab.config import load_config
    from fundus_lab.data.tokenizer import default_corpus, train_tokenizer

    cfg = load_config(preset=preset, method="coca" if kind == "coca" else "clip", overrides=overrides)
    torch.manual_seed(cfg.train.seed)
    device = torch.device(resolve_device(device))
    tokenizer = train_tokenizer(default_corpus(), vocab_size=cfg.model.vocab_size, model_max_length=cfg.model.text_max_length)
    batch = example_batch(cfg, cfg.train.batch_size)
    ids = tokenizer(batch["text"], padding=True, truncation=True, max_length=cfg.model.text_max_length,
                    return_tensors="pt")["input_ids"].to(device)
    images = batch["image"].to(device)
    model, loss_fn = build_open_clip(kind, cfg, tokenizer, ids.shape[1])
    model = model.to(device).train()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    cuda = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step():
        with amp:
            out = model(images, ids)
            if kind == "coca":
                loss = loss_fn(out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"])
                loss = sum(loss) if isinstance(loss, tuple) else loss
            else:
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        if cfg.train.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rss_before = _max_rss_mib()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    warm_start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - warm_start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    if cuda:
        peak, peak_kind, extra = torch.cuda.max_memory_allocated() / 2**20, "cuda max allocated", None
        extra = peak - base
    else:
        peak, peak_kind = _max_rss_mib(), "max RSS"
        extra = peak - rss_before
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    n = cfg.train.batch_size
    result = {
        "method": f"open_clip:{kind}", "preset": preset, "device": str(device), "precision": "bf16" if cuda else "no",
        "params_m": params / 1e6, "batch_size": n, "img_size": cfg.model.img_size, "steps": steps,
        "step_s": elapsed / steps, "images_per_s": steps * n / elapsed, "warmup_s": warmup_s,
        "peak_mem_mib": peak, "peak_kind": peak_kind,
        "step_extra_mib": extra, "gflops_per_image": flops / n / 1e9, "achieved_tflops": flops * steps / elapsed / 1e12,
        "threads": torch.get_num_threads(), "optimizer": optimizer_kind(optimizer),
    }
    if cuda:
        name = torch.cuda.get_device_name()
        peak_flops = gpu_peak_flops(name, peak_tflops)
        result["gpu"] = name
        if peak_flops:
            result["mfu"] = flops * steps / elapsed / peak_flops
    return result


def open_clip_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("open_clip") is not None


def run_child(args, method: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--preset", args.preset,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
           *(["--peak", str(args.peak)] if args.peak is not None else []), *args.overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"method": method, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def run_matmul_child(args) -> dict:
    """The machine's matmul rate (:func:`matmul_rate`) measured in a child like the methods'."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "matmul", "--preset", args.preset,
           "--device", args.device, *args.overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"matmul rate: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(lines[-1])


def optimizer_kind(optimizer) -> str:
    """How AdamW steps: ``fused`` (one kernel per parameter), ``foreach`` or ``for-loop``."""
    group = getattr(optimizer, "optimizer", optimizer).param_groups[0]  # accelerate wraps it
    return "fused" if group.get("fused") else "foreach" if group.get("foreach") else "for-loop"


def with_matmul_share(results: list[dict], rates: dict[str, float]) -> None:
    """Add achieved GFLOP/s and its percentage of the model-shape matmul rate (mean over the
    model's shapes) and of the large square one to each result, in place."""
    model_shapes = [v for k, v in rates.items() if k != "2048^3"]
    model_rate = sum(model_shapes) / len(model_shapes)
    for r in results:
        if "error" in r:
            continue
        r["gflops_per_s"] = r["achieved_tflops"] * 1e3
        r["pct_model_matmul"] = 100 * r["gflops_per_s"] / model_rate
        r["pct_square_matmul"] = 100 * r["gflops_per_s"] / rates["2048^3"]


def median_round(method: str, runs: list[dict]) -> dict:
    """The round of ``method`` with the median img/s (the lower middle one for an even count),
    with every round's img/s beside it; an error if any round failed."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda r: r["images_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "rounds_images_per_s": [r["images_per_s"] for r in runs]}


def paired_ratios(rounds: list[dict[str, dict]], method: str, reference: str = "clip") -> list[float]:
    """img/s of ``method`` over ``reference`` within each round (the two ran minutes apart at most)."""
    return [r[method]["images_per_s"] / r[reference]["images_per_s"] for r in rounds
            if "error" not in r.get(method, {"error": 1}) and "error" not in r.get(reference, {"error": 1})]


def rounds_table(methods: list[str], rounds: list[dict[str, dict]]) -> str:
    """Per method: img/s of every round, and its ratio to clip within each round and their median."""
    import statistics

    lines = [f"{'method':<16}{'img/s per round':>40}{'vs clip per round':>36}{'median':>8}"]
    for m in methods:
        speeds = " ".join(f"{r[m]['images_per_s']:.1f}" if "error" not in r[m] else "failed" for r in rounds)
        ratios = paired_ratios(rounds, m) if "clip" in methods else []
        median = f"{statistics.median(ratios):.2f}x" if ratios else "-"
        lines.append(f"{m:<16}{speeds:>40}{' '.join(f'{x:.2f}' for x in ratios):>36}{median:>8}")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    clip = next((r for r in results if r["method"] == "clip" and "error" not in r), None)
    head = (f"{'method':<16}{'params M':>9}{'img/s':>9}{'vs clip':>9}{'step s':>9}{'warm-up s':>10}{'peak MiB':>10}"
            f"{'step +MiB':>10}{'GFLOP/img':>10}{'GFLOP/s':>9}{'%mm model':>10}{'%mm 2048':>9}{'MFU':>7}")
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['method']:<16}  failed: {r['error']}")
            continue
        ratio = f"{r['images_per_s'] / clip['images_per_s']:.2f}x" if clip else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        lines.append(
            f"{r['method']:<16}{r['params_m']:>9.2f}{r['images_per_s']:>9.1f}{ratio:>9}{r['step_s']:>9.3f}"
            f"{r.get('warmup_s', float('nan')):>10.1f}"
            f"{r['peak_mem_mib']:>10.0f}{r['step_extra_mib']:>10.0f}{r['gflops_per_image']:>10.2f}"
            f"{r.get('gflops_per_s', float('nan')):>9.1f}{r.get('pct_model_matmul', float('nan')):>9.1f}%"
            f"{r.get('pct_square_matmul', float('nan')):>8.1f}%{mfu:>7}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--methods", default="all", help="comma-separated, or 'all' (every configs/methods file)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, lazy init)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--reverse", action="store_true", help="run the methods in reverse order (clip last)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every method this many times, the order reversed every other round; the table "
                             "shows each method's median round, and each ratio to clip is the median of the "
                             "per-round ratios (a VM's drifting speed hits both sides of a pair alike)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when visible), cpu or cuda")
    parser.add_argument("--peak", type=float, help="the GPU's dense bf16 peak in TFLOP/s (default: by device name)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.batch_size=16")
    args = parser.parse_args(argv)

    if args.child:
        if args.child == "matmul":
            # torch's default threads, as every method's child (OMP_NUM_THREADS where set)
            print(json.dumps(matmul_rate(matmul_shapes(args.preset, args.overrides), resolve_device(args.device))))
        elif args.child.startswith("open_clip:"):
            print(json.dumps(measure_open_clip(args.preset, args.child.split(":", 1)[1], args.steps, args.warmup,
                                               args.overrides, args.device, args.peak)))
        else:
            print(json.dumps(measure(args.preset, args.child, args.steps, args.warmup, args.overrides, args.device,
                                     args.peak)))
        return 0

    from fundus_lab.config import available_methods

    if args.methods == "all":
        methods = available_methods()
        if open_clip_available():  # the reference implementations, side by side
            methods += ["open_clip:clip", "open_clip:coca"]
    else:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "clip" in methods:  # the reference first
        methods.remove("clip")
        methods.insert(0, "clip")
    if args.reverse:  # a second run in the other order: a drift in the machine's load hits the other end
        methods.reverse()
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: expected 1 or more")
    rates_before = run_matmul_child(args)
    rounds: list[dict[str, dict]] = []
    for i in range(args.rounds):
        order = methods if i % 2 == 0 else methods[::-1]
        rounds.append({})
        for method in order:
            r = rounds[-1][method] = run_child(args, method)
            print(f"  round {i + 1}/{args.rounds} {method}: "
                  + (f"{r['images_per_s']:.1f} img/s" if "error" not in r else f"failed ({r['error']})"),
                  file=sys.stderr, flush=True)
    results = [median_round(method, [r[method] for r in rounds]) for method in methods]
    rates_after = run_matmul_child(args)  # before and after: a shared machine's rate drifts
    rates = {k: (rates_before[k] + rates_after[k]) / 2 for k in rates_before}
    with_matmul_share(results, rates)
    first = next((r for r in results if "error" not in r), {})
    print(f"preset {args.preset}, device {first.get('gpu', first.get('device'))}, precision {first.get('precision')}, "
          f"batch {first.get('batch_size')} x {first.get('img_size')}px, {args.steps} timed steps after {args.warmup} warm-up")
    unit = "bf16" if first.get("gpu") else "fp32"
    print(f"machine {unit} matmul GFLOP/s (before / after the methods): "
          + ", ".join(f"{k} {rates_before[k]:.1f} / {rates_after[k]:.1f}" for k in rates))
    print(table(results))
    if args.rounds > 1:
        print(rounds_table(methods, rounds))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matmul_gflops": {"before": rates_before, "after": rates_after}, "results": results}, f, indent=1)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
