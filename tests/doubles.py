"""Test doubles shared by several test files (``from doubles import ...``); the fixtures built
from them live in ``tests/conftest.py``. Nothing here is collected as a test.

- tiny method models: ``TINY`` sizes, ``METHODS``, ``TEXTS``, ``method_config``, ``tiny_model``, ``batch``;
- evaluation: ``ToyDataset`` mimics ``FundusDataset`` (classes, class_keys, task, records, root,
  split, class_prompts, items with "image"/"label"). ``PlantedModel`` returns chosen vectors:
  an image's embedding is its per-channel mean brightness mapped through a fixed matrix, a
  prompt's embedding is looked up in a dict, so zero-shot predictions can be worked out by
  hand. ``ToyViT`` is a small learnable model with ``image_encoder.blocks`` for fine-tuning;
- training: ``DoubleModel`` (two named loss terms, a random mask each forward), ``DoubleData``
  (random augmentation from the global RNG), ``make_cfg`` and ``weights`` for the loop's tests;
- notebooks: ``write_notebook``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import nbformat
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from fundus_lab.config import CONFIG_DIR, Config, TrainConfig, from_dict
from fundus_lab.data.records import Record
from fundus_lab.models import FundusVLM, MethodConfig, ModelConfig, build_model


# ---------------------------------------------------------------------------------------
# tiny models of every method


METHOD_DIR = Path(__file__).resolve().parents[1] / "configs" / "methods"
METHODS = sorted(p.stem for p in METHOD_DIR.glob("*.yaml"))
TEXTS = [
    "moderate diabetic retinopathy with dot and blot haemorrhages",
    "normal fundus, no abnormality",
    "glaucoma: enlarged cup with a thin rim",
    "cataract, hazy blurred image of the retina",
]
TINY = dict(
    img_size=32, patch_size=16, vision_width=32, vision_depth=2, vision_heads=2, text_width=32, text_depth=2,
    text_heads=2, text_max_length=32, embed_dim=16, fusion_depth=1, fusion_heads=2, decoder_width=32,
    decoder_depth=1, decoder_heads=2, text_decoder_depth=1, caption_depth=1,
)


def method_config(name: str, **over) -> MethodConfig:
    path = METHOD_DIR / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    from_dict(Config, data, str(path))  # the whole file fits the run config schema
    cfg = from_dict(MethodConfig, data["method"], str(path))
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(name, tokenizer, seed=0, **over) -> FundusVLM:
    torch.manual_seed(seed)
    if name == "vilref":
        over.setdefault("queue_size", 6)
    # a method's own model keys (visionclip: model.image_encoder) on top of the tiny sizes
    method_model = yaml.safe_load((CONFIG_DIR / "methods" / f"{name}.yaml").read_text()).get("model") or {}
    return build_model(ModelConfig(**{**TINY, **method_model}), method_config(name, **over), tokenizer)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(4, 8)
    labels[[0, 1, 2, 3], [1, 0, 2, 1]] = 1  # samples 0 and 3 share a category
    return {"image": torch.rand(4, 3, 32, 32, generator=g), "text": list(TEXTS), "label": labels}


# ---------------------------------------------------------------------------------------
# evaluation: a dataset and models with planted embeddings


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


# ---------------------------------------------------------------------------------------
# the training loop: a 2-term model that draws random masks, a dataset with random augmentation


class DoubleModel(nn.Module):
    """Two named loss terms, a random mask each forward (exercises the RNG), a no-decay scalar."""

    def __init__(self, size=4):
        super().__init__()
        self.size = size
        self.enc = nn.Linear(3 * size * size, 8)
        self.norm = nn.LayerNorm(8)
        self.dec = nn.Linear(8, 3 * size * size)
        self.head = nn.Linear(8, 2)
        self.logit_scale = nn.Parameter(torch.tensor(1.0))
        self.steps_done = 0

    def forward(self, batch):
        x = batch["image"].flatten(1)
        keep = (torch.rand_like(x) > 0.5).float()
        z = self.norm(self.enc(x * keep))
        recon_loss = ((self.dec(z) - x) ** 2).mean()
        cls_loss = nn.functional.cross_entropy(self.head(z) * self.logit_scale, batch["label"])
        return {"loss": recon_loss + 0.5 * cls_loss, "image_gen_loss": recon_loss, "class_loss": cls_loss,
                "logit_scale": self.logit_scale.detach()}

    def after_optimizer_step(self):
        self.steps_done += 1

    def save_pretrained(self, folder):
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(Path(folder) / "model.safetensors"))
        (Path(folder) / "config.json").write_text(json.dumps({"size": self.size}))


def load_double(folder):
    model = DoubleModel(**json.loads((Path(folder) / "config.json").read_text()))
    model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
    return model


@dataclass
class Rec:
    path: str
    text: str
    patient_id: str = "p"
    eye: str = "left"
    split: str = "train"


class DoubleData(torch.utils.data.Dataset):
    def __init__(self, n=12, size=4):
        g = torch.Generator().manual_seed(1)
        self.images = torch.rand(n, 3, size, size, generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.records = [Rec(f"img{i}.png", f"report {i}") for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]
        if torch.rand(()) < 0.5:  # augmentation from the global RNG, as real datasets do
            image = image.flip(-1)
        return {"image": image, "label": self.labels[i], "text": self.records[i].text, "index": i}


def double_collate(items):
    return {"image": torch.stack([it["image"] for it in items]), "label": torch.stack([it["label"] for it in items]),
            "text": [it["text"] for it in items]}


def make_cfg(run_dir, **train):
    base = dict(steps=8, batch_size=4, lr=0.05, min_lr=0.0, warmup_steps=2, log_every=1, save_every=2,
                keep_checkpoints=2, output_dir=str(run_dir), log_with="none", progress=False, mixed_precision="no")
    base.update(train)
    return Config(train=TrainConfig(**base))


def weights(run_dir):
    return load_file(str(Path(run_dir) / "checkpoint-last" / "model.safetensors"))


# ---------------------------------------------------------------------------------------
# the compare runs: tiny model, data and budget overrides


COMPARE_MODEL_TINY = [  # model, data and budget of the compare tests
    "model.img_size=32", "model.patch_size=16", "model.vision_width=32", "model.vision_depth=2",
    "model.vision_heads=2", "model.text_width=32", "model.text_depth=1", "model.text_heads=2",
    "model.embed_dim=32", "model.fusion_heads=2", "model.decoder_width=32", "model.decoder_depth=1",
    "model.decoder_heads=2", "model.caption_depth=1", "model.vocab_size=500",
    "data.image_size=32", "data.synth_n=64", "data.synth_eval_n=60", "data.synth_image_size=32",
    "data.augment=false", "train.steps=2", "train.batch_size=8", "train.warmup_steps=1", "train.log_every=1",
    "train.tensorboard=false", "train.progress=false",
]
COMPARE_TINY = COMPARE_MODEL_TINY + [
    "eval.shots=[1,2]", "eval.seeds=2", "eval.fine_tune_seeds=1", "eval.fine_tune_epochs=1",
    "eval.bootstrap=20", "eval.batch_size=16", "eval.fine_tune_batch_size=8",
]


# ---------------------------------------------------------------------------------------
# the outside-model compare runs


EXTERNAL_COMPARE_TINY = COMPARE_MODEL_TINY + [
    "eval.shots=[1,2]", "eval.seeds=2", "eval.bootstrap=20", "eval.batch_size=16", "eval.progress=false",
]


def external_compare_run(out: Path, extra=()):
    from fundus_lab.experiment import Run

    if not (CONFIG_DIR / "presets" / "smoke.yaml").is_file():
        pytest.skip("configs/presets/smoke.yaml not written yet")
    return Run("smoke", out / "run", out / "data", EXTERNAL_COMPARE_TINY + list(extra))


# ---------------------------------------------------------------------------------------
# outside models: tiny random open_clip and Hugging Face CLIP checkpoints


OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
OUTSIDE_TEXTS = ["a fundus photograph of diabetic retinopathy", "normal fundus", "glaucoma"]


def outside_normalise(x, mean=MEAN, std=STD):
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def save_tiny_open_clip(folder, seed: int = 0):
    """A random open_clip CLIP saved in ``folder`` as safetensors with its hub-style config
    beside it (other test modules build their outside models with it). Returns the model."""
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    src = CLIP(**OPEN_CLIP_CFG).eval()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": OPEN_CLIP_CFG, "preprocess_cfg": {"mean": list(MEAN), "std": list(STD)}}))
    return src


def save_tiny_hf_clip(folder):
    """A random transformers CLIPModel saved in ``folder`` with a tokenizer and preprocessor
    config (other test modules build their outside models with it). Returns (model, tokenizer)."""
    from transformers import CLIPConfig, CLIPModel

    from fundus_lab.data.tokenizer import default_corpus, train_tokenizer

    tok = train_tokenizer(default_corpus(), vocab_size=300, model_max_length=24)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=24, eos_token_id=tok.sep_token_id,
                         bos_token_id=tok.cls_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(1)
    src = CLIPModel(cfg).eval()
    src.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": list(MEAN), "image_std": list(STD)}))
    return src, tok


def outside_features(out):
    return out if torch.is_tensor(out) else out.pooler_output


# ---------------------------------------------------------------------------------------
# the tiny clip model of the export, model-io and convention tests


CLIP_TEXTS = ["hard exudates around the macula", "normal fundus", "enlarged cup and thin rim in glaucoma", "drusen"]
CLIP_TINY = dict(img_size=32, patch_size=16, vision_width=32, vision_depth=2, vision_heads=2, text_width=32,
                 text_depth=2, text_heads=2, text_max_length=32, embed_dim=16, fusion_heads=2, decoder_width=32,
                 decoder_depth=1, decoder_heads=2, image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3))
CLIP = dict(name="clip", image_gen_weight=0.0, caption_weight=0.0, cross_attention=False)
CLIP_TINY_PLAIN = dict(
    img_size=32, patch_size=16, vision_width=32, vision_depth=2, vision_heads=2, text_width=32, text_depth=2,
    text_heads=2, text_max_length=32, embed_dim=16, fusion_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2,
)


def export_normalise(x):
    return (x - torch.tensor(CLIP_TINY["image_mean"]).view(1, 3, 1, 1)) / torch.tensor(CLIP_TINY["image_std"]).view(1, 3, 1, 1)


# ---------------------------------------------------------------------------------------
# a tiny two-class dataset manifest (labels.csv, img/)


TWO_CLASS_MANIFEST = {
    "name": "tiny",
    "task": "multiclass",
    "metric": "accuracy",
    "classes": [{"name": "normal", "key": "normal"}, {"name": "glaucoma", "key": "glaucoma"}],
    "sources": [{
        "annotations": "labels.csv",
        "image": {"column": "image", "template": "img/{value}"},
        "label": {"column": "label", "codes": {"0": "normal", "1": "glaucoma"}},
        "patient": {"column": "patient"},
    }],
    "split": {"fractions": {"train": 0.5, "val": 0.25, "test": 0.25}, "seed": 1},
}


# ---------------------------------------------------------------------------------------
# the bad-input matrix's dataset folder, broken one way per case


# the two-class manifest with an eye column
BAD_INPUT_MANIFEST = {**TWO_CLASS_MANIFEST, "sources": [{**TWO_CLASS_MANIFEST["sources"][0], "eye": {"column": "eye"}}]}
BAD_INPUT_HEADER = "image,label,patient,eye"
BAD_INPUT_ROWS = [f"a{i}.png,{i % 2},p{i // 2},{'left' if i % 2 else 'right'}" for i in range(8)]


class Case:
    """A dataset folder being broken: ``root``, the manifest dict ``m``, the CSV rows."""

    def __init__(self, root: Path):
        self.root = root
        self.m = yaml.safe_load(yaml.safe_dump(BAD_INPUT_MANIFEST))
        self.header, self.rows = BAD_INPUT_HEADER, list(BAD_INPUT_ROWS)
        self.csv_bytes: Optional[bytes] = None
        self.manifest_text: Optional[str] = None
        (root / "img").mkdir(parents=True)
        for i in range(10):
            arr = np.zeros((12, 12, 3), np.uint8)
            arr[2:10, 2:10] = (150, 70, 30)
            Image.fromarray(arr).save(root / "img" / f"a{i}.png")

    @property
    def src(self) -> dict:
        return self.m["sources"][0]

    def write(self) -> Path:
        data = self.csv_bytes if self.csv_bytes is not None else ("\n".join([self.header, *self.rows]) + "\n").encode()
        (self.root / "labels.csv").write_bytes(data)
        path = self.root / "tiny.yaml"
        path.write_text(self.manifest_text if self.manifest_text is not None else yaml.safe_dump(self.m, sort_keys=False))
        return path


# ---------------------------------------------------------------------------------------
# an open_clip checkpoint that ships code


def evil_open_clip(folder: Path, marker: Path, **text_cfg) -> Path:
    """A loadable tiny open_clip checkpoint whose tokenizer folder ships code that writes
    ``marker``; ``text_cfg`` entries replace the issue's defaults (None removes one)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_tiny_open_clip(folder)
    tok = folder / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}, "tokenizer_class": "EvilTokenizer"}))
    (tok / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('code ran')\n\n"
        "class EvilTokenizer:\n    pass\n")
    config = json.loads((folder / "open_clip_config.json").read_text())
    fields = {"hf_tokenizer_name": str(tok), "tokenizer_kwargs": {"trust_remote_code": True}, **text_cfg}
    for key, value in fields.items():
        if value is None:
            config["model_cfg"]["text_cfg"].pop(key, None)
        else:
            config["model_cfg"]["text_cfg"][key] = value
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder


# ---------------------------------------------------------------------------------------
# the widgets' colour model: patches and prompts by colour


COLOURS = {"red": 0, "green": 1, "blue": 2}


class ColourModel(torch.nn.Module):
    img_size = 16
    patch_size = 8

    def __init__(self, scale: float = 10.0):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(scale)))

    def encode_patches(self, images):  # [N, 3, 16, 16] -> [N, 4, 3] mean colour per 8x8 patch
        n = images.shape[0]
        p = images.unfold(2, 8, 8).unfold(3, 8, 8)  # [N, 3, 2, 2, 8, 8]
        return p.mean(dim=(-1, -2)).reshape(n, 3, 4).transpose(1, 2)

    def encode_image(self, images):
        return torch.nn.functional.normalize(images.mean(dim=(2, 3)), dim=-1)

    def encode_text(self, texts):
        out = torch.full((len(texts), 3), 1e-3)
        for i, t in enumerate(texts):
            for word, j in COLOURS.items():
                if word in t.lower():
                    out[i, j] = 1.0
        return torch.nn.functional.normalize(out, dim=-1)


def colour_image(left, right) -> torch.Tensor:
    img = torch.zeros(3, 16, 16)
    img[:, :, :8] = torch.tensor(left, dtype=torch.float32)[:, None, None]
    img[:, :, 8:] = torch.tensor(right, dtype=torch.float32)[:, None, None]
    return img


# ---------------------------------------------------------------------------------------
# a tiny fine-tuned classifier (the ``saved`` fixture saves it with three images)


CLASSIFIER_TINY = dict(img_size=32, patch_size=16, vision_width=32, vision_depth=2, vision_heads=2, embed_dim=16,
            decoder_width=32, decoder_depth=1, decoder_heads=2)
CLASSIFIER_CLASSES = ["no DR", "mild NPDR", "moderate NPDR"]


# ---------------------------------------------------------------------------------------
# real dataset layouts: tiny fundus pictures, files, the APTOS 2019 folder


def fundus(path: Path, w: int = 30, h: int = 24, seed: int = 0) -> Path:
    """A tiny fundus-like picture (bright disc on black), saved by its extension."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    disc = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (min(h, w) / 2 - 1) ** 2
    colour = np.array([170, 80, 40]) + rng.integers(-20, 20, 3)
    arr = (disc[..., None] * colour).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF", ".png": "PNG"}[path.suffix.lower()]
    Image.fromarray(arr).save(path, format=fmt)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def build_aptos(root: Path) -> dict:
    ids = [f"{i:04x}a1b2c3" for i in range(20)]
    grades = [i % 5 for i in range(20)]
    write(root / "train.csv", "id_code,diagnosis\n" + "".join(f"{i},{g}\n" for i, g in zip(ids, grades)))
    for k, i in enumerate(ids):
        fundus(root / "train_images" / f"{i}.png", seed=k)
    write(root / "test.csv", "id_code\nffff0000\n")  # no labels: never read
    fundus(root / "test_images" / "ffff0000.png")
    return dict(zip(ids, grades))


# ---------------------------------------------------------------------------------------
# notebooks


def write_notebook(path: Path, params: str, *cells: str) -> None:
    """A tiny numbered notebook as ``reproduce`` runs them: a heading, a ``parameters``-tagged
    cell holding ``params``, then one code cell per entry of ``cells``."""
    nb = nbformat.v4.new_notebook()
    first = nbformat.v4.new_code_cell(params)
    first.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {path.stem}"), first] + [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


REPRODUCE_PARAMS = 'preset = "default"\nrun_dir = "runs/notebooks"\ndata_root = None\nmethods = None\n'


def reproduce_notebook(path: Path, *cells: str) -> None:
    write_notebook(path, REPRODUCE_PARAMS, *cells)
