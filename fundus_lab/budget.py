"""Training compute: FLOPs of one optimizer step, and the step counts of an equal-FLOPs budget.

``train.budget: steps`` (the paper's reading) trains every method ``train.steps`` steps.
``train.budget: flops`` gives each method the steps that make its training FLOPs equal the
FLOPs of ``train.budget_method`` (default ``ours``) at ``train.steps``;
:func:`fundus_lab.experiment.configs.resolve_run_config` calls :func:`budget_steps` for that,
so the resolved config already holds the steps.

FLOPs are counted, not estimated: one forward + backward of the built model on an example
batch of ``train.batch_size`` images under ``torch.utils.flop_counter.FlopCounterMode``
(``benchmarks/train_throughput.py`` reports the same count per image), times
``train.grad_accum_steps``. The optimizer's elementwise work is left out (negligible).

A method's total: ``steps x FLOPs per step``; a two-stage method (EVA-CLIP,
``method.stage1_fraction``) counts each stage's steps at that stage's FLOPs; a method whose
image-generation target is a teacher it does not have yet (EVA without
``method.teacher_checkpoint``) also counts the CLIP teacher's training
(``train.teacher_steps`` steps, default ``train.steps``, at CLIP's FLOPs per step).
"""

from __future__ import annotations

import functools
import json
import random
import warnings

import numpy as np
import torch

from fundus_lab import config as C
from fundus_lab import knowledge
from fundus_lab.data.text_source import describe
from fundus_lab.data.tokenizer import default_corpus, train_tokenizer
from fundus_lab.models import build_model
from fundus_lab.models.model import stage1_steps

TEACHER_METHOD = "clip"  # EVA's teacher: a CLIP trained on the same data (experiment.Run.checkpoint)


def example_batch(cfg: "C.Config", n: int, seed: int = 0) -> dict:
    """A fixed training batch: random images, texts like ``data.text_source``'s (definitions of
    one or two drawn knowledge-base classes; knowledge-base sentences for ``report``),
    multi-hot labels. No disk, no decoding: only the model's cost is measured."""
    rng = random.Random(seed)
    sentences = [s for s in knowledge.corpus() if len(s.split()) > 3]
    classes = knowledge.class_keys()

    def definitions() -> str:  # one or two labels, as in synth-pretrain
        return "; ".join(describe(k, rng) for k in rng.sample(classes, k=rng.choice([1, 1, 2]))) + "."

    def report() -> str:
        return " ".join(rng.sample(sentences, k=min(4, len(sentences))))

    source = cfg.data.text_source
    texts = [{"definitions": definitions, "report": report, "both": lambda: f"{definitions()} {report()}"}[source]()
             for _ in range(n)]
    g = torch.Generator().manual_seed(seed)
    side = cfg.model.img_size
    return {
        "image": torch.rand(n, 3, side, side, generator=g),
        "text": texts,
        "label": (torch.rand(n, cfg.method.num_labels, generator=g) < 0.3).float(),
    }


def count_step_flops(model: torch.nn.Module, batch: dict, backward=None) -> int:
    """FLOPs of one forward + backward of ``model`` on ``batch`` (FlopCounterMode); the
    gradients are dropped afterwards. ``backward``: the caller's (``accelerator.backward``)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = model(batch)
        (backward or torch.Tensor.backward)(out["loss"])
    for p in model.parameters():
        p.grad = None
    return int(counter.get_total_flops())


def _flops_key(cfg: "C.Config") -> str:
    """What the count depends on: the model, the method and the batch (not steps, seeds, paths)."""
    method = C.to_dict(cfg.method)
    method.pop("name", None)
    method.pop("teacher_checkpoint", None)  # the teacher's weights, not its cost (same model config)
    return json.dumps({"model": C.to_dict(cfg.model), "method": method, "batch_size": cfg.train.batch_size,
                       "text_source": cfg.data.text_source}, sort_keys=True, default=str)


@functools.lru_cache(maxsize=8)
def _tokenizer(vocab_size: int, max_length: int):
    """The benchmark's tokenizer (trained on the knowledge base): the text length it gives is
    what the count sees (a run's own tokenizer is trained on its pretraining texts)."""
    return train_tokenizer(default_corpus(), vocab_size=vocab_size, model_max_length=max_length)


@functools.lru_cache(maxsize=64)
def _stage_flops(key: str) -> tuple[int, ...]:
    """(FLOPs per micro-batch) for each training stage of the config ``key`` describes: one
    entry for one-stage methods, (stage 1, stage 2) for two-stage ones. Cached per process."""
    data = json.loads(key)
    cfg = C.from_dict(C.Config, {"model": data["model"], "method": data["method"],
                                 "train": {"batch_size": data["batch_size"]},
                                 "data": {"text_source": data["text_source"]}}, "<flops>")
    py, nps, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:  # counting must not move the global random streams a training run draws from
        torch.manual_seed(0)
        m = cfg.method
        tokenizer = None  # image-only (MAE): no text branch
        if m.contrastive_weight > 0 or m.caption_weight > 0:
            tokenizer = _tokenizer(cfg.model.vocab_size, cfg.model.text_max_length)
        with warnings.catch_warnings():  # a teacher-less EVA counts the same FLOPs; its warning is for training
            warnings.simplefilter("ignore", UserWarning)
            model = build_model(cfg.model, m, tokenizer).train()
        batch = example_batch(cfg, cfg.train.batch_size)
        if m.stage1_fraction <= 0:
            return (count_step_flops(model, batch),)
        total = 1000
        counts = []
        for step in (0, total - 1):  # the first step is stage 1, the last stage 2
            model.set_progress(step, total)
            counts.append(count_step_flops(model, batch))
        return tuple(counts)
    finally:
        random.setstate(py)
        np.random.set_state(nps)
        torch.set_rng_state(th)


def step_flops(cfg: "C.Config") -> tuple[int, ...]:
    """FLOPs of one optimizer step (``grad_accum_steps`` micro-batches) per training stage."""
    return tuple(f * cfg.train.grad_accum_steps for f in _stage_flops(_flops_key(cfg)))


def counts_teacher(cfg: "C.Config") -> bool:
    """Whether this run trains its teacher first (EVA without a given ``teacher_checkpoint``)."""
    m = cfg.method
    return m.image_gen_weight > 0 and m.image_gen_target == "teacher" and not m.teacher_checkpoint


def method_flops(cfg: "C.Config", steps: int) -> int:
    """Training FLOPs of the method of ``cfg`` at ``steps`` steps, without its teacher."""
    per_stage = step_flops(cfg)
    if len(per_stage) == 1:
        return steps * per_stage[0]
    first = stage1_steps(cfg.method.stage1_fraction, steps)
    return first * per_stage[0] + (steps - first) * per_stage[1]


def teacher_config(cfg: "C.Config") -> "C.Config":
    """The config EVA's teacher is counted (and trained) with: CLIP at ``cfg``'s model and batch."""
    return C.load_config(preset=cfg.preset, method=TEACHER_METHOD,
                         overrides={"model": C.to_dict(cfg.model), "data": {"text_source": cfg.data.text_source},
                                    "train": {k: getattr(cfg.train, k) for k in C.BUDGET_KEYS}})


def training_flops(cfg: "C.Config") -> dict:
    """The run's compute as the table legend states it: {"steps", "teacher_steps" (or None),
    "flops_per_step" (per stage), "flops" (total, teacher included)}."""
    steps = cfg.train.steps
    total = method_flops(cfg, steps)
    teacher_steps = None
    if counts_teacher(cfg):
        teacher_steps = cfg.train.teacher_steps or steps
        total += teacher_steps * step_flops(teacher_config(cfg))[0]
    return {"steps": steps, "teacher_steps": teacher_steps, "flops_per_step": list(step_flops(cfg)),
            "flops": total}


def budget_steps(cfg: "C.Config", budget_flops: float) -> tuple[int, int | None]:
    """(steps, teacher steps or None) that make the run of ``cfg`` cost ``budget_flops``.

    The rule: ``steps = round(budget / FLOPs of one step averaged over the run)`` (at least 1);
    a method that trains its teacher gives the teacher the same number of steps, so
    ``budget = steps x (teacher step + stage-weighted own step)``."""
    f = cfg.method.stage1_fraction
    per_stage = step_flops(cfg)
    per_step = per_stage[0] if len(per_stage) == 1 else f * per_stage[0] + (1 - f) * per_stage[1]
    if counts_teacher(cfg):
        per_step += step_flops(teacher_config(cfg))[0]
    steps = max(1, int(round(budget_flops / per_step)))
    return steps, (steps if counts_teacher(cfg) else None)


__all__ = ["budget_steps", "count_step_flops", "counts_teacher", "example_batch", "method_flops", "step_flops",
           "teacher_config", "training_flops"]
