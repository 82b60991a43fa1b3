"""Where our clip's step differs from open_clip's CLIP at equal size: CPU time per step,
variants interleaved in one process.

    OMP_NUM_THREADS=1 python benchmarks/clip_vs_open_clip.py --reps 6
    OMP_NUM_THREADS=1 python benchmarks/clip_vs_open_clip.py --reps 2 --profile   # + torch.profiler op tables

Each variant is one optimizer step on the same fixed batch (``train_throughput.py``'s):

- ``clip``: the trainer's step (``fundus_lab.train.train_step``) as it runs now;
- ``clip/for-loop-adamw``: the same with the for-loop AdamW the trainer used before;
- ``clip/bert-dropout-0.1``: the text tower with BertConfig's default dropout of 0.1 (hidden
  states and attention probabilities), as clip trained before ``model.text_dropout: 0.0``
  (CLIP's and open_clip's text Transformers have none);
- ``open_clip:clip``: open_clip's ``CLIP`` at the same sizes with ``ClipLoss``, clipping and AdamW.

The variants run in turn, the order reversed every repetition; the figure is the median
process CPU time per step (``time.process_time``), which a shared machine's other jobs
disturb far less than wall time (with one thread, CPU time is the step's own work).
``--profile`` prints torch.profiler's top operators of two steps of ``clip`` and of
``open_clip:clip`` (op counts are exact; times are as noisy as the machine).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def build_variants(preset: str, overrides: list[str]) -> dict:
    import torch
    from accelerate import Accelerator

    import train_throughput as B
    from fundus_lab import optim
    from fundus_lab import train as T
    from fundus_lab.budget import example_batch
    from fundus_lab.config import load_config
    from fundus_lab.data.tokenizer import default_corpus, train_tokenizer
    from fundus_lab.models import build_model
    from fundus_lab.sampling import to_device

    cfg = load_config(preset=preset, method="clip", overrides=overrides)
    accelerator = Accelerator(mixed_precision="no", cpu=True)
    tokenizer = train_tokenizer(default_corpus(), vocab_size=cfg.model.vocab_size,
                                model_max_length=cfg.model.text_max_length)
    batch = to_device(example_batch(cfg, cfg.train.batch_size), "cpu")

    def forever():
        while True:
            yield batch

    def ours(device, text_dropout: float | None = None):
        torch.manual_seed(cfg.train.seed)
        model_cfg = copy.copy(cfg.model)
        if text_dropout is not None:
            model_cfg.text_dropout = text_dropout
        model = build_model(model_cfg, cfg.method, tokenizer).train()
        optimizer = optim.build_optimizer(model, cfg.train, device)
        scheduler = optim.build_scheduler(optimizer, cfg.train)
        data, step = forever(), [0]

        def run():
            step[0] += 1
            T.train_step(accelerator, model, optimizer, scheduler, data, cfg.train, step[0])
        return run

    ids = tokenizer(batch["text"], padding=True, truncation=True, max_length=cfg.model.text_max_length,
                    return_tensors="pt")["input_ids"]
    reference, loss_fn = B.build_open_clip("clip", cfg, tokenizer, ids.shape[1])
    reference.train()
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    def open_clip_step():
        out = reference(batch["image"], ids)
        loss_fn(out["image_features"], out["text_features"], out["logit_scale"]).backward()
        if cfg.train.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.train.clip_grad_norm)
        ref_optimizer.step()
        ref_optimizer.zero_grad(set_to_none=True)

    return {"clip": ours("cpu"), "clip/for-loop-adamw": ours(None),
            "clip/bert-dropout-0.1": ours("cpu", text_dropout=0.1), "open_clip:clip": open_clip_step}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--reps", type=int, default=6, help="timed steps per variant (after 2 untimed)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler tables")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    import torch

    variants = build_variants(args.preset, args.overrides)
    for step in variants.values():
        step(), step()
    times = {name: [] for name in variants}
    wall = time.perf_counter()
    for rep in range(args.reps):
        for name in (list(variants) if rep % 2 == 0 else list(variants)[::-1]):
            start = time.process_time()
            variants[name]()
            times[name].append(time.process_time() - start)
    reference = statistics.median(times["open_clip:clip"])
    print(f"preset {args.preset}, {torch.get_num_threads()} thread(s), {args.reps} steps each, "
          f"{time.perf_counter() - wall:.0f} s wall, load average {os.getloadavg()[0]:.1f}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<22} CPU s/step median {median:.3f} (min {min(values):.3f})   speed vs open_clip:clip "
              f"{reference / median:.2f}x")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in ("clip", "open_clip:clip"):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                variants[name](), variants[name]()
            events = prof.key_averages()
            print(f"== {name}: {sum(e.count for e in events)} operator calls in 2 steps")
            print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    sys.exit(main())
