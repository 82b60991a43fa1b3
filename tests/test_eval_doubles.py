"""Test doubles for the evaluation tests: a dataset and models with planted embeddings.

``ToyDataset`` mimics ``FundusDataset`` (classes, class_keys, task, records, root, split,
class_prompts, items with "image"/"label"). ``PlantedModel`` returns chosen vectors:
an image's embedding is its per-channel mean brightness mapped through a fixed matrix,
a prompt's embedding is looked up in a dict, so zero-shot predictions can be worked out
by hand. ``ToyViT`` is a small learnable model with ``image_encoder.blocks`` for
fine-tuning. Nothing here is collected as a test.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from fundus_lab.data.records import Record


class ToyDataset(torch.utils.data.Dataset):
    """Images whose colour encodes the class: channel c bright for class c.

    Args:
        labels: [N] class indices or [N, C] multi-hot rows.
        patients: patient id per sample (default: one patient per sample, prefixed).
    """

    def __init__(self, labels, classes, task="multiclass", size=8, noise=0.05, seed=0,
                 patients=None, prompts=None, class_keys=None, root="/toy", split="train"):
        self.labels = np.asarray(labels)
        self.classes = list(classes)
        self.class_keys = list(class_keys) if class_keys else [None] * len(self.classes)
        self.task = task
        self.root = root
        self.split = split
        self.image_size = size
        self.metric = "accuracy"
        self._prompts = prompts or [[f"prompt {c}"] for c in self.classes]
        rng = np.random.default_rng(seed)
        n = len(self.labels)
        patients = patients or [f"{split}-p{i}" for i in range(n)]
        self.records = [
            Record(path=f"{root}/{split}/{i}.png", label=(row.tolist() if self.labels.ndim == 2 else int(row)),
                      patient_id=patients[i], split=split)
            for i, row in enumerate(self.labels)
        ]
        hot = self.labels if self.labels.ndim == 2 else np.eye(len(self.classes))[self.labels]
        base = 0.2 + 0.6 * hot[:, :3] if hot.shape[1] >= 3 else np.c_[0.2 + 0.6 * hot, np.full((n, 3 - hot.shape[1]), 0.2)]
        imgs = base[:, :, None, None] + noise * rng.standard_normal((n, 3, size, size))
        self.images = torch.as_tensor(np.clip(imgs, 0, 1), dtype=torch.float32)

    def class_prompts(self):
        return [list(p) for p in self._prompts]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        row = self.labels[i]
        label = torch.as_tensor(row, dtype=torch.float32) if self.labels.ndim == 2 else torch.tensor(int(row))
        return {"image": self.images[i], "label": label, "text": None, "patient_id": self.records[i].patient_id,
                "eye": None, "path": self.records[i].path, "index": i}


class PlantedModel(nn.Module):
    """encode_image(x) = normalise(mean_rgb(x) @ image_map); encode_text looks prompts up."""

    def __init__(self, image_map: np.ndarray, text_vectors: dict, scale: float = 10.0):
        super().__init__()
        self.register_buffer("image_map", torch.as_tensor(image_map, dtype=torch.float32))
        self.text_vectors = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in text_vectors.items()}
        self.logit_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.text_calls = 0

    def encode_image(self, images):
        return nn.functional.normalize(images.mean(dim=(2, 3)) @ self.image_map, dim=-1)

    def image_features(self, images, mask_ratio=0.0):
        cls = images.mean(dim=(2, 3)) @ self.image_map
        return {"cls": cls, "tokens": cls[:, None], "mask": None, "ids_restore": None}

    def encode_text(self, texts):
        self.text_calls += 1
        missing = [t for t in texts if t not in self.text_vectors]
        if missing:
            raise KeyError(f"no planted vector for prompts {missing}")
        return nn.functional.normalize(torch.stack([self.text_vectors[t] for t in texts]), dim=-1)


class ImageOnlyModel(PlantedModel):
    """Like an MAE: image features, no text encoder (declared, as FundusVLM does)."""

    text_encoder = None
    capabilities = frozenset()

    def __init__(self, image_map):
        super().__init__(image_map, {})


class ToyBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.fc(self.norm(x)))


class ToyEncoder(nn.Module):
    def __init__(self, width=8, depth=2, patch=4):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(ToyBlock(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.embed_dim = width

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [N, L, W]
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)
        x = x.mean(1, keepdim=True) + x  # let the class token see the patches
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class ToyViT(nn.Module):
    """A learnable stand-in for the pretrained model: ``image_features`` and ``image_encoder.blocks``."""

    def __init__(self, width=8, depth=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.image_encoder = ToyEncoder(width, depth)
        self.text_encoder = nn.Linear(4, 4)  # present but unused by image protocols

    def image_features(self, images, mask_ratio=0.0):
        x = self.image_encoder(images)
        return {"cls": x[:, 0], "tokens": x[:, 1:], "mask": None, "ids_restore": None}

    def encode_image(self, images):
        return nn.functional.normalize(self.image_features(images)["cls"], dim=-1)
