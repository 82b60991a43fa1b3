"""Zero-shot classification from class prompts (no labelled image seen).

Each class is described by an ensemble of prompts from the knowledge base (its name,
synonyms, "a fundus photograph of <name>", the definition, one sentence per sign); the
class embedding is the re-normalised mean of the prompts' text embeddings
(CLIP's prompt ensembling; FLAIR's expert-knowledge prompts). An image is scored by the
scaled cosine similarity to each class embedding:

    logits[n, c] = s * <z_img[n], t_c>,   t_c = normalise(mean_p encode_text(prompt_{c,p}))

- multiclass / ordinal / binary: probs = softmax_c(logits) (the classes compete).
- multilabel: classes do not compete (an eye can have DR *and* cataract), so each class is
  a two-way choice between its own prompts and a "no <class>" contrast:
      P(c | x) = sigmoid(s * (<z, t_c> - <z, t_not_c>))
  This gives a calibrated-looking probability per class that can be thresholded at 0.5
  (F1, ODIR score), which per-class AUC on raw similarities alone could not; the AUC
  is reported as well and is threshold-free. Multilabel datasets also report accuracy on
  the single-label subset (images with exactly one positive class, argmax over classes),
  which is what zero-shot papers quote for ODIR.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

from fundus_lab.eval.features import extract_features
from fundus_lab.eval.metrics import accuracy, compute_metrics


class ZeroShotUnavailable(ValueError):
    """The model has no text encoder (e.g. an image-only MAE), so zero-shot is undefined."""


def has_text_encoder(model) -> bool:
    """Whether the model embeds text in its image space (zero-shot, prompt heads).

    A model that declares ``capabilities`` (every ``FundusVLM``) answers with
    ``"text_embedding"``; an outside model (open_clip, Hugging Face CLIP) declares nothing
    and counts as able when it has ``encode_text``."""
    caps = getattr(model, "capabilities", None)
    if caps is not None:
        return "text_embedding" in caps
    return callable(getattr(model, "encode_text", None))


def logit_scale(model) -> float:
    """The inverse temperature ``s = exp(model.logit_scale)``, clamped as in training.

    Models store the log of ``s`` (CLIP, open_clip) so it stays positive while learned;
    the cap is ``model.method_cfg.max_logit_scale`` (CLIP: 100). Without a learned
    temperature (no contrastive term) CLIP's cap, 100, is used.
    """
    cap = float(getattr(getattr(model, "method_cfg", None), "max_logit_scale", 100.0))
    value = getattr(model, "logit_scale", None)
    if value is None:
        return cap
    value = float(value.detach().cpu()) if torch.is_tensor(value) else float(value)
    return min(math.exp(value), cap)


def resolve_prompts(ds, prompts: Sequence[Sequence[str]] | Mapping[str, Sequence[str]] | None) -> list[list[str]]:
    """Per-class prompt lists in ``ds.classes`` order.

    ``prompts`` may be None (the dataset's knowledge prompts), a list with one list per
    class, or a dict keyed by class name (or knowledge key) covering every class.
    """
    classes = list(ds.classes)
    if prompts is None:
        out = [list(p) for p in ds.class_prompts()]
    elif isinstance(prompts, Mapping):
        keys = list(getattr(ds, "class_keys", None) or [None] * len(classes))
        missing, out = [], []
        for name, key in zip(classes, keys):
            if name in prompts:
                out.append([prompts[name]] if isinstance(prompts[name], str) else list(prompts[name]))
            elif key is not None and key in prompts:
                out.append([prompts[key]] if isinstance(prompts[key], str) else list(prompts[key]))
            else:
                missing.append(name)
        if missing:
            raise ValueError(f"prompts: no entry for classes {missing}; the dataset's classes are {classes}")
        unknown = set(prompts) - set(classes) - {k for k in keys if k}
        if unknown:
            raise ValueError(f"prompts: keys {sorted(unknown)} are not classes of the dataset ({classes})")
    else:
        out = [[p] if isinstance(p, str) else list(p) for p in prompts]
        if len(out) != len(classes):
            raise ValueError(f"prompts: got {len(out)} prompt lists for {len(classes)} classes {classes}")
    for name, plist in zip(classes, out):
        if not plist or not all(isinstance(p, str) and p.strip() for p in plist):
            raise ValueError(f"prompts for class {name!r} must be a non-empty list of non-empty strings, got {plist!r}")
    return out


@torch.no_grad()
def class_embeddings(model, class_prompts: Sequence[Sequence[str]], batch_size: int = 64) -> torch.Tensor:
    """[C, D] prompt-ensemble embeddings: t_c = normalise(mean_p encode_text(prompt_{c,p}))."""
    if not has_text_encoder(model):
        raise ZeroShotUnavailable(f"{type(model).__name__} has no text encoder; zero-shot needs one")
    was_training = model.training
    model.eval()
    try:
        flat = [p for plist in class_prompts for p in plist]
        emb = torch.cat([model.encode_text(flat[i:i + batch_size]) for i in range(0, len(flat), batch_size)])
    finally:
        model.train(was_training)
    emb = torch.nn.functional.normalize(emb.float(), dim=-1)
    out, start = [], 0
    for plist in class_prompts:
        out.append(emb[start:start + len(plist)].mean(0))
        start += len(plist)
    return torch.nn.functional.normalize(torch.stack(out), dim=-1)


def negative_prompts(ds, class_prompts: Sequence[Sequence[str]]) -> list[list[str]]:
    """The "no <class>" contrast prompts for multilabel scoring, one list per class.

    The class's name is its knowledge-base name (else its first prompt); "normal" is
    contrasted with an abnormal fundus, since "no normal fundus" is not how reports speak.
    """
    keys = list(getattr(ds, "class_keys", None) or [None] * len(class_prompts))
    out = []
    for key, plist in zip(keys, class_prompts):
        name = plist[0]
        if key is not None:
            try:
                from fundus_lab import knowledge

                name = knowledge.entry(key)["name"]
            except KeyError:
                pass
        if key == "normal":
            out.append(["abnormal fundus", "a fundus photograph with retinal disease", "signs of retinal pathology"])
        else:
            out.append([f"no {name}", f"a fundus photograph without {name}", f"no signs of {name}"])
    return out


def zero_shot_logits(
    image_features: np.ndarray, text_features: torch.Tensor | np.ndarray, scale: float
) -> np.ndarray:
    """[N, D] x [C, D] -> [N, C] scaled cosine similarities (inputs are L2-normalised here)."""
    img = torch.nn.functional.normalize(torch.as_tensor(image_features, dtype=torch.float32), dim=-1)
    txt = torch.nn.functional.normalize(torch.as_tensor(text_features, dtype=torch.float32), dim=-1)
    return (scale * img @ txt.T).numpy()


def zero_shot(
    model,
    ds,
    prompts: Sequence[Sequence[str]] | Mapping[str, Sequence[str]] | None = None,
    batch_size: int = 64,
    bootstrap: int = 0,
    seed: int = 0,
    cache_dir=None,
    multilabel_scoring: str = "softmax",
    progress: bool = True,
) -> dict:
    """Classify ``ds`` from class prompts alone (``progress``: the feature-extraction bar).

    Multi-label sets are scored per class by the softmax over the class prompts
    (``multilabel_scoring="softmax"``, as CLIP and FLAIR score categories). The
    ``"negation"`` alternative contrasts each class with "no <class>" prompts; it needs a
    text tower that has learnt negation, which none trained on names and definitions has:
    measured on synth-odir's val split at the default preset, its macro AUC was 0.39-0.56
    (below chance for clip, ours, coca) where the softmax gave 0.71-0.84.

    Returns:
        {"metrics": compute_metrics(ds.task, ...) (+ single_label_accuracy / _n for
        multilabel), "probs": [N, C], "labels": [N] or [N, C], "logits": [N, C],
        "prompts": the per-class prompt lists used}
    Raises:
        ZeroShotUnavailable if the model has no text encoder.
    """
    if not has_text_encoder(model):
        raise ZeroShotUnavailable(f"{type(model).__name__} has no text encoder; zero-shot needs one")
    class_prompts = resolve_prompts(ds, prompts)
    text = class_embeddings(model, class_prompts, batch_size)
    image, labels = extract_features(model, ds, kind="embed", batch_size=batch_size, cache_dir=cache_dir,
                                     progress=progress)
    scale = logit_scale(model)
    logits = zero_shot_logits(image, text.cpu(), scale)
    softmax = torch.softmax(torch.as_tensor(logits), dim=-1).numpy()
    if multilabel_scoring not in ("softmax", "negation"):
        raise ValueError(f"multilabel_scoring={multilabel_scoring!r}; expected 'softmax' or 'negation'")
    if ds.task == "multilabel" and multilabel_scoring == "negation":
        negative = class_embeddings(model, negative_prompts(ds, class_prompts), batch_size)
        contrast = logits - zero_shot_logits(image, negative.cpu(), scale)
        probs = torch.sigmoid(torch.as_tensor(contrast)).numpy()
    else:
        probs = softmax
    metrics = compute_metrics(ds.task, labels, probs, bootstrap=bootstrap, seed=seed)
    if ds.task == "multilabel":
        single = labels.sum(1) == 1
        metrics["single_label_n"] = int(single.sum())
        metrics["single_label_accuracy"] = (
            accuracy(labels[single].argmax(1), softmax[single].argmax(1)) if single.any() else float("nan")
        )
    return {"metrics": metrics, "probs": probs, "labels": labels, "logits": logits, "prompts": class_prompts}


__all__ = [
    "ZeroShotUnavailable", "class_embeddings", "has_text_encoder", "logit_scale",
    "negative_prompts", "resolve_prompts", "zero_shot", "zero_shot_logits",
]
