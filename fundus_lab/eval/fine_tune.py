"""Full fine-tuning of the image encoder with a linear head (BEiT/MAE recipe, scaled down).

- Layer-wise learning-rate decay: block i of L gets lr * decay^(L - i); the patch
  embedding, class token and position embedding get lr * decay^(L + 1); the final norm
  and the head get lr. Early layers hold generic features and move least.
- AdamW, linear warm-up then cosine decay, no weight decay on biases, norms and tokens.
- Class-balanced loss (optional, Cui et al. 2019): class c weighted by
  (1 - beta) / (1 - beta^n_c), normalised to mean 1 (multilabel: positives of class c
  weighted by n_neg / n_pos).
- Model selection on the *validation* split only: after every epoch the primary metric
  (quadratic weighted kappa for ordinal grades, balanced accuracy for multiclass, AUC for
  binary and multilabel) is computed on ``val_ds``; the best state is kept and training
  stops after ``patience`` epochs without improvement. ``test_ds`` is scored once, with
  the best state. Ordinal grades are learned as classes (cross-entropy), the common
  APTOS baseline, and selected by kappa.

The pretrained model passed in is copied, never modified.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fundus_lab.eval.features import _image_label_collate, dataset_labels, is_main_process, model_device
from fundus_lab.eval.honesty import assert_disjoint
from fundus_lab.eval.metrics import compute_metrics, primary_metric
from fundus_lab.optim import cosine_schedule, no_weight_decay

_EMBED_NAMES = ("cls_token", "pos_embed", "patch_embed", "reg_token", "mask_token", "pos_drop", "norm_pre")


class FineTuneClassifier(nn.Module):
    """[N, 3, H, W] -> [N, C] logits: the pretrained model's class token through a linear head."""

    def __init__(self, backbone: nn.Module, n_classes: int, width: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(width, n_classes)
        nn.init.zeros_(self.head.weight)  # start from uniform predictions, as MAE's tiny init
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.image_features(images, mask_ratio=0.0)["cls"])


def layer_id(name: str, n_blocks: int) -> int:
    """0 for the embedding, i + 1 for ``blocks.i``, n_blocks + 1 for everything after."""
    name = name.removeprefix("trunk.")  # image towers keep the timm model under .trunk
    if name.startswith(_EMBED_NAMES):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return n_blocks + 1


def param_groups(classifier: FineTuneClassifier, lr: float, layer_decay: float, weight_decay: float) -> list[dict]:
    """AdamW groups with lr * layer_decay^(L + 1 - layer) and no decay on 1-d params / tokens.

    Only the image encoder, the modules its pooled feature passes through
    (``backbone.image_feature_modules``: CoCa's attentional pooler and projection, at the
    head's lr) and the head are trained; other parts of the backbone (text branch,
    decoders) are frozen because the classifier never uses them.
    """
    encoder = classifier.backbone.image_encoder
    if not hasattr(encoder, "blocks"):
        raise AttributeError(f"{type(encoder).__name__} has no .blocks; layer-wise lr decay needs the ViT blocks")
    n_blocks = len(encoder.blocks)
    for p in classifier.backbone.parameters():
        p.requires_grad_(False)
    groups: dict[tuple[int, bool], dict] = {}

    def add(name: str, p: nn.Parameter, lid: int):
        p.requires_grad_(True)
        no_decay = no_weight_decay(name, p)
        key = (lid, no_decay)
        if key not in groups:
            scale = layer_decay ** (n_blocks + 1 - lid)
            groups[key] = {"params": [], "lr": lr * scale, "lr_scale": scale,
                           "weight_decay": 0.0 if no_decay else weight_decay, "layer": lid}
        groups[key]["params"].append(p)

    for name, p in encoder.named_parameters():
        add(name, p, layer_id(name, n_blocks))
    for module_name in getattr(classifier.backbone, "image_feature_modules", ()):
        for name, p in getattr(classifier.backbone, module_name).named_parameters():
            add(f"{module_name}.{name}", p, n_blocks + 1)
    for name, p in classifier.head.named_parameters():
        add(name, p, n_blocks + 1)
    return [groups[k] for k in sorted(groups)]


def class_balanced_weights(labels: np.ndarray, n_classes: int, beta: float = 0.999) -> torch.Tensor:
    """Cui et al.: w_c = (1 - beta) / (1 - beta^n_c), normalised to mean 1 over classes.

    Multi-hot labels: n_neg / n_pos per class (a BCE ``pos_weight``).
    """
    labels = np.asarray(labels)
    if labels.ndim == 2:
        pos = labels.sum(0)
        return torch.as_tensor((len(labels) - pos) / np.maximum(pos, 1), dtype=torch.float32)
    counts = np.bincount(labels.astype(int), minlength=n_classes).astype(np.float64)
    effective = (1.0 - np.power(beta, counts)) / (1.0 - beta)
    w = np.where(counts > 0, 1.0 / np.maximum(effective, 1e-12), 0.0)
    w = w / w[counts > 0].mean()
    return torch.as_tensor(w, dtype=torch.float32)


def _width(model: nn.Module, sample: torch.Tensor) -> int:
    encoder = model.image_encoder
    if not getattr(model, "image_feature_modules", ()):  # else the pooled feature is not the encoder's width (CoCa)
        for attr in ("num_features", "embed_dim"):
            if isinstance(getattr(encoder, attr, None), int):
                return getattr(encoder, attr)
    with torch.no_grad():
        return int(model.image_features(sample[None], mask_ratio=0.0)["cls"].shape[-1])


@torch.no_grad()
def predict(classifier: nn.Module, ds, task: str, batch_size: int = 64, num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(probs [N, C], labels) of ``ds`` in order: softmax, or sigmoid for multilabel."""
    classifier.eval()
    device = model_device(classifier)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_image_label_collate)
    probs, labels = [], []
    for images, y in loader:
        logits = classifier(images.to(device)).float()
        probs.append((torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, -1)).cpu().numpy())
        labels.append(y.numpy())
    return np.concatenate(probs), np.concatenate(labels)


def fine_tune(
    model,
    train_ds,
    val_ds,
    test_ds,
    epochs: int = 10,
    lr: float = 5e-4,
    layer_decay: float = 0.75,
    weight_decay: float = 0.05,
    batch_size: int = 32,
    warmup_epochs: float = 1.0,
    class_balanced: bool = False,
    beta: float = 0.999,
    patience: int = 3,
    seed: int = 0,
    bootstrap: int = 0,
    num_workers: int = 0,
    return_model: bool = False,
    progress: bool = True,
) -> dict:
    """Fine-tune a copy of ``model``'s image encoder + a linear head on ``train_ds``.

    ``progress``: a bar over epochs (train loss, validation metric) on the main process.

    Returns:
        {"metrics": test metrics of the best-on-validation state, "probs", "labels",
         "best_epoch", "best_val": the selection metric there, "selection_metric",
         "history": [{"epoch", "train_loss", "val": {...}}], "model" if return_model}
    """
    assert_disjoint(train_ds, test_ds, "fine-tune train", "test")
    assert_disjoint(val_ds, test_ds, "fine-tune validation", "test")
    task, n_classes = test_ds.task, len(test_ds.classes)
    if epochs < 1:
        raise ValueError(f"epochs={epochs}; need at least one epoch")
    torch.manual_seed(seed)
    device = model_device(model)
    backbone = copy.deepcopy(model)
    classifier = FineTuneClassifier(backbone, n_classes, _width(backbone, train_ds[0]["image"].to(device))).to(device)
    groups = param_groups(classifier, lr, layer_decay, weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr)

    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, drop_last=len(train_ds) > batch_size,
                        num_workers=num_workers, collate_fn=_image_label_collate, generator=generator)
    total = epochs * len(loader)
    scheduler = cosine_schedule(optimizer, int(round(warmup_epochs * len(loader))), total)  # decays to 0
    weights = class_balanced_weights(dataset_labels(train_ds), n_classes, beta).to(device) if class_balanced else None
    if task == "multilabel":
        criterion = nn.BCEWithLogitsLoss(pos_weight=weights)
    else:
        criterion = nn.CrossEntropyLoss(weight=weights)

    selection = primary_metric(task)
    best_val, best_state, best_epoch, history, stale = -math.inf, None, -1, [], 0
    bar = tqdm(total=epochs, desc="fine-tune epochs", unit="epoch", disable=not (progress and is_main_process()),
               leave=False)
    for epoch in range(epochs):
        classifier.train()
        losses = []
        for images, y in loader:
            logits = classifier(images.to(device))
            target = y.to(device).float() if task == "multilabel" else y.to(device).long()
            loss = criterion(logits.float(), target)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tuning loss is {loss.item()} at epoch {epoch}; lower lr (now {lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        probs, labels = predict(classifier, val_ds, task, batch_size, num_workers)
        val = compute_metrics(task, labels, probs)
        score = val[selection] if np.isfinite(val[selection]) else -math.inf
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val": val})
        bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", **{selection: f"{val[selection]:.3f}"})
        bar.update()
        if score > best_val or best_state is None:
            best_val, best_epoch, stale = score, epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in classifier.state_dict().items()}
        else:
            stale += 1
            if stale >= patience:
                break
    bar.close()
    classifier.load_state_dict(best_state)
    probs, labels = predict(classifier, test_ds, task, batch_size, num_workers)
    out = {
        "metrics": compute_metrics(task, labels, probs, bootstrap=bootstrap, seed=seed),
        "probs": probs, "labels": labels, "best_epoch": best_epoch, "best_val": float(best_val),
        "selection_metric": selection, "history": history,
    }
    if return_model:
        out["model"] = classifier
    return out


__all__ = ["FineTuneClassifier", "class_balanced_weights", "fine_tune", "layer_id", "param_groups", "predict"]
