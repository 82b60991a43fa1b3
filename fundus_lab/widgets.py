"""Prompt playground: pick or upload a fundus image, write class prompts, see what the model thinks.

The logic is plain functions that tests call directly (:func:`parse_prompts`,
:func:`load_image_bytes`, :func:`score`, :func:`playground_figure`); :class:`PromptPlayground`
is only the ipywidgets glue around them.

Prompt text: one class per line; several prompts for one class separated by ``|`` or ``;``.
The class is named by its first prompt. Blank lines and lines starting with ``#`` are skipped.

    normal fundus | healthy retina
    diabetic retinopathy; microaneurysms and dot haemorrhages; hard exudates

Scores follow zero-shot evaluation exactly (:mod:`fundus_lab.eval.zero_shot`): the class
embedding is the re-normalised mean of its prompts' embeddings and

    p(c | x) = softmax_c(s * <z_img, t_c>)

The heat map of a prompt is the cosine similarity of each projected patch token with the
prompt's embedding (:func:`fundus_lab.eval.explain.patch_prompt_similarity`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fundus_lab import viz
from fundus_lab.data.dataset import open_dataset
from fundus_lab.data.images import _rgb8_from_pil
from fundus_lab.eval.explain import patch_prompt_similarity, upsample_map
from fundus_lab.eval.zero_shot import class_embeddings, has_text_encoder, logit_scale
from fundus_lab.models import load_model

MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # a fundus photograph is a few MB; more is a mistake
MAX_PIXELS = 40_000_000  # ~ 6300 x 6300; larger files are refused before decoding
# uploads are decoded at about this side at most (JPEG draft / integer reduce): the model
# sees 224-448 pixels, and a 6300 x 6300 PNG of 0.15 MB once took 3.2 GB to score
MAX_SIDE = 1024
ACCEPTED_FORMATS = ("PNG", "JPEG")


class PromptError(ValueError):
    """Prompt text that does not describe at least two classes."""


class ImageInputError(ValueError):
    """An uploaded file that is not a usable PNG/JPEG image."""


# ---------------------------------------------------------------------------------------
# pure logic


def parse_prompts(text: str) -> dict[str, list[str]]:
    """Prompt text -> ordered ``{class name: [prompts]}`` (see the module docstring).

    Raises:
        PromptError: fewer than two classes, or a class given twice (line numbers named).
    """
    classes: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        prompts = [p.strip() for p in line.replace(";", "|").split("|") if p.strip()]
        if not prompts:
            continue
        name = prompts[0]
        if name in classes:
            raise PromptError(f"prompts line {lineno}: class {name!r} was already given on line {first_line[name]}")
        classes[name] = prompts
        first_line[name] = lineno
    if len(classes) < 2:
        raise PromptError(f"prompts: need at least two classes (one per line) to compare, got {len(classes)}")
    return classes


def format_prompts(class_prompts: Mapping[str, Sequence[str]] | Sequence[Sequence[str]], max_per_class: int = 3) -> str:
    """The inverse of :func:`parse_prompts` (first ``max_per_class`` prompts of each class)."""
    lists = class_prompts.values() if isinstance(class_prompts, Mapping) else class_prompts
    return "\n".join(" | ".join(list(p)[:max_per_class]) for p in lists)


def load_image_bytes(data: bytes, name: str = "upload", max_side: int = MAX_SIDE) -> "Image.Image":
    """Decode an uploaded PNG/JPEG to 8-bit RGB, refusing anything else with a readable message.

    Checks, in order: size on disk, that it is an image at all, its format, and its pixel
    count (read from the header, before the pixels are decoded). Large images are decoded at
    reduced size (JPEG: ``draft``, at most ``max_side`` or a little more; others: an integer
    ``reduce`` right after decoding), so memory stays near the decoded 8/16-bit image. Modes
    are converted as the dataset path does (``images._rgb8_from_pil``): a 16-bit PNG is
    rescaled by its range, not clipped to white.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if len(data) == 0:
        raise ImageInputError(f"{name}: the file is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise ImageInputError(f"{name}: {len(data) / 2**20:.1f} MB is too large; the limit is {MAX_UPLOAD_BYTES / 2**20:.0f} MB")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageInputError(f"{name}: too many pixels ({err})") from None
    except (UnidentifiedImageError, OSError):
        raise ImageInputError(f"{name}: not an image (expected a PNG or JPEG file)") from None
    if img.format not in ACCEPTED_FORMATS:
        raise ImageInputError(f"{name}: {img.format} images are not accepted; expected PNG or JPEG")
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise ImageInputError(f"{name}: {w}x{h} pixels is too large; the limit is {MAX_PIXELS / 1e6:.0f} megapixels")
    try:
        if img.format == "JPEG" and max(w, h) > max_side:
            img.draft(img.mode, (max_side, max_side))  # DCT scaling: never decodes the full size
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # in place: no full-size copy
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageInputError(f"{name}: the image could not be decoded ({err})") from None
    factor = max(img.size) // max_side
    if factor >= 2 and img.mode in ("P", "PA"):  # reduce() takes no palette: expand it first (issue 16, item 11)
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    if factor >= 2 and img.mode in ("L", "RGB", "RGBA", "LA", "I", "F"):
        img = img.reduce(factor)  # before the conversion: it works on the smaller image
        factor = 1
    rgb = Image.fromarray(_rgb8_from_pil(img))
    return rgb.reduce(factor) if factor >= 2 else rgb


def model_image_size(model) -> int:
    """The square input size the model was built for."""
    enc = getattr(model, "image_encoder", None)
    for obj in (enc, model):
        size = getattr(obj, "img_size", None)
        if size is not None:
            return int(size[0] if isinstance(size, (tuple, list)) else size)
    cfg = getattr(model, "model_cfg", None) or getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "img_size", None):
        return int(cfg.img_size)
    raise AttributeError(f"{type(model).__name__}: cannot tell its input size (no image_encoder.img_size)")


def image_tensor(image: Any, size: int):
    """PIL image / array / ``[3, H, W]`` tensor -> ``[1, 3, size, size]`` float tensor in [0, 1]."""
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(viz.to_hwc(image), dtype=torch.float32).permute(2, 0, 1)[None]
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return t.clamp(0, 1)


def patch_embeddings(model, images):
    """Patch tokens projected into the joint image-text space, ``[N, L, D]``.

    ``model.encode_patches`` when the model has one; otherwise the ViT's patch tokens go
    through the same projection as the CLS token (``image_proj``), the dense read-out of
    MaskCLIP (Zhou et al., 2022) that needs no extra training.
    """
    fn = getattr(model, "encode_patches", None)
    if callable(fn):
        return fn(images)
    proj = getattr(model, "image_proj", None)
    if proj is None or not callable(getattr(model, "image_features", None)):
        raise AttributeError(
            f"{type(model).__name__} has neither encode_patches(images) nor image_features + image_proj; "
            "prompt maps need patch tokens in the text embedding space (a contrastive method)"
        )
    return proj(model.image_features(images)["tokens"])


def _method_name(model) -> str:
    return str(getattr(getattr(model, "method_cfg", None), "name", "model"))


@dataclass
class PromptScores:
    """What :func:`score` found for one image.

    Attributes:
        classes: class names in prompt order.
        prompts: per class, its prompts.
        probs: ``[C]`` softmax over classes.
        similarity: ``[C]`` cosine similarity of the image with each class embedding.
        prompt_maps: per class, ``[P_c, gh, gw]`` patch-to-prompt similarity of each prompt.
        image: ``[size, size, 3]`` the image as the model saw it (for display).
    """

    classes: list[str]
    prompts: list[list[str]]
    probs: np.ndarray
    similarity: np.ndarray
    prompt_maps: list[np.ndarray]
    image: np.ndarray

    def table(self) -> list[tuple[str, float]]:
        return list(zip(self.classes, [float(p) for p in self.probs]))


def score(model, image: Any, prompts: str | Mapping[str, Sequence[str]]) -> PromptScores:
    """Class probabilities and per-prompt heat maps for one image.

    Args:
        model: anything with ``encode_image``, ``encode_text``, ``encode_patches`` and
            ``logit_scale`` (see the model contract).
        image: PIL image, ``[H, W, 3]`` array or ``[3, H, W]`` tensor in [0, 1].
        prompts: prompt text (:func:`parse_prompts`) or ``{class: [prompts]}``.
    """
    import torch

    if not has_text_encoder(model):
        raise ValueError(f"{type(model).__name__} ({_method_name(model)}) has no text embedding to compare prompts with; pick a contrastive checkpoint")
    parsed = parse_prompts(prompts) if isinstance(prompts, str) else {k: list(v) for k, v in prompts.items()}
    classes, plists = list(parsed), list(parsed.values())
    x = image_tensor(image, model_image_size(model))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            z = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)  # [1, D]
            t = class_embeddings(model, plists)  # [C, D]
            sim = (z @ t.T)[0]  # [C]
            probs = torch.softmax(logit_scale(model) * sim, dim=-1)
            patches = patch_embeddings(model, x).float()  # [1, L, D]
            flat = [p for plist in plists for p in plist]
            prompt_emb = model.encode_text(flat).float()  # [P, D]
    finally:
        model.train(was_training)
    maps = patch_prompt_similarity(patches, prompt_emb)[0]  # [P, gh, gw]
    split = np.cumsum([len(p) for p in plists])[:-1]
    return PromptScores(
        classes=classes,
        prompts=plists,
        probs=probs.numpy(),
        similarity=sim.numpy(),
        prompt_maps=list(np.split(maps, split)),
        image=x[0].permute(1, 2, 0).numpy(),
    )


def playground_figure(result: PromptScores, max_maps: int = 8):
    """Bar chart of class probabilities, then the image under each prompt's heat map.

    All maps share one colour scale so a prompt that matches nowhere stays cold.
    """
    from matplotlib.figure import Figure

    flat = [(c, p, m) for c, plist, maps in zip(result.classes, result.prompts, result.prompt_maps) for p, m in zip(plist, maps)]
    flat = flat[:max_maps]
    up = upsample_map(np.stack([m for _, _, m in flat]), result.image.shape[:2], normalize=False)
    lo, hi = float(up.min()), float(up.max())
    ncols = 1 + len(flat)
    fig = Figure(figsize=(3.2 + 2.4 * len(flat), 2.9), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False, width_ratios=[1.4] + [1] * len(flat))[0]
    y = np.arange(len(result.classes))
    axes[0].barh(y, result.probs, color="tab:blue")
    # parse_math=False: prompts are plain text ("$\\alpha$" is shown, not typeset or raised on)
    axes[0].set_yticks(y, [c if len(c) <= 24 else c[:23] + "…" for c in result.classes], fontsize=8, parse_math=False)
    axes[0].invert_yaxis()
    axes[0].set_xlim(0, 1)
    axes[0].set_xlabel("probability")
    for i, p in enumerate(result.probs):
        axes[0].text(min(float(p) + 0.02, 0.8), i, f"{p:.2f}", va="center", fontsize=8)
    for ax, (c, prompt, _), heat in zip(axes[1:], flat, up):
        ax.imshow(result.image)
        mappable = ax.imshow(heat, cmap="jet", alpha=0.5, vmin=lo, vmax=hi)
        ax.set_title(prompt if len(prompt) <= 26 else prompt[:25] + "…", fontsize=8, parse_math=False)
        ax.set_axis_off()
    if flat:
        fig.colorbar(mappable, ax=axes[-1], shrink=0.7, label="cosine similarity")
    return fig


def probability_html(result: PromptScores) -> str:
    """The probabilities as an HTML table (what a reader, or a browser test, reads as text)."""
    import html

    rows = "".join(
        f"<tr><td class='fl-class'>{html.escape(c)}</td><td class='fl-prob'>{p:.4f}</td></tr>" for c, p in result.table()
    )
    return f"<table class='fl-probs'><tr><th>class</th><th>probability</th></tr>{rows}</table>"


# ---------------------------------------------------------------------------------------
# widget glue


class PromptPlayground:
    """ipywidgets front end: image (dataset item or upload), checkpoint, prompts -> probabilities + maps.

    Args:
        datasets: name -> dataset (anything indexable whose items have ``"image"``), or
            names / a name -> manifest mapping opened with :func:`fundus_lab.data.open_dataset`
            on first use.
        checkpoints: label -> checkpoint directory (loaded with :func:`fundus_lab.load_model`
            on first use) or an already loaded model.
        prompts: initial prompt text; by default the first dataset's knowledge prompts.
        data_root: ``root`` passed to ``open_dataset`` for named datasets.
        split: split opened for named datasets.

    Every change (dataset, index, upload, checkpoint, prompts) re-scores; errors are shown
    in the widget's message line, never raised into the notebook.
    """

    def __init__(
        self,
        datasets: Mapping[str, Any] | Sequence[str],
        checkpoints: Mapping[str, Any],
        prompts: str | None = None,
        data_root: str | Path | None = None,
        split: str = "test",
    ):
        import ipywidgets as W

        if not isinstance(datasets, Mapping):
            datasets = {str(d): str(d) for d in datasets}
        if not datasets or not checkpoints:
            raise ValueError("PromptPlayground: needs at least one dataset and one checkpoint")
        self._datasets = dict(datasets)
        self._checkpoints = dict(checkpoints)
        self._opened: dict[str, Any] = {}
        self._models: dict[str, Any] = {}
        self.data_root, self.split = data_root, split
        self.uploaded = None  # PIL image once a file is uploaded; None -> dataset image
        self.result: PromptScores | None = None

        self.dataset = W.Dropdown(options=list(self._datasets), description="dataset")
        self.index = W.BoundedIntText(value=0, min=0, max=0, description="image #")
        self.upload = W.FileUpload(accept=".png,.jpg,.jpeg", multiple=False, description="upload")
        self.use_dataset = W.Button(description="use dataset image", tooltip="forget the uploaded image")
        self.checkpoint = W.Dropdown(options=list(self._checkpoints), description="checkpoint")
        self.prompts = W.Textarea(
            value=prompts or "",
            description="prompts",
            placeholder="one class per line; prompts of a class separated by | or ;",
            continuous_update=False,  # re-score when the edit is done, not at every keystroke
            layout=W.Layout(width="95%", height="120px"),
        )
        self.message = W.HTML(value="")
        self.probabilities = W.HTML(value="")
        self.figure = W.Image(format="png")
        self.widget = W.VBox(
            [
                W.HBox([self.dataset, self.index, self.checkpoint]),
                W.HBox([self.upload, self.use_dataset]),
                self.prompts,
                self.message,
                W.HBox([self.probabilities]),
                self.figure,
            ]
        )
        self.widget.add_class("fl-playground")

        self._on_dataset()
        if not self.prompts.value.strip():
            self.prompts.value = self.default_prompts()
        self.dataset.observe(lambda _: self._on_dataset(update=True), names="value")
        self.index.observe(lambda _: self.update(), names="value")
        self.checkpoint.observe(lambda _: self.update(), names="value")
        self.prompts.observe(lambda _: self.update(), names="value")
        self.upload.observe(lambda change: self.on_upload(change["new"]), names="value")
        self.use_dataset.on_click(lambda _: self.clear_upload())
        self.update()

    # -- state ------------------------------------------------------------------------
    def current_dataset(self):
        name = self.dataset.value
        if name not in self._opened:
            spec = self._datasets[name]
            if isinstance(spec, (str, Path)):
                spec = open_dataset(spec, root=self.data_root, split=self.split)
            self._opened[name] = spec
        return self._opened[name]

    def current_model(self):
        label = self.checkpoint.value
        if label not in self._models:
            spec = self._checkpoints[label]
            if isinstance(spec, (str, Path)):
                spec = load_model(spec)
            self._models[label] = spec
        return self._models[label]

    def current_image(self):
        if self.uploaded is not None:
            return self.uploaded
        return self.current_dataset()[int(self.index.value)]["image"]

    def default_prompts(self) -> str:
        try:
            ds = self.current_dataset()
            return format_prompts(ds.class_prompts())
        except Exception:  # noqa: BLE001 - a dataset without knowledge prompts simply gets none
            return ""

    # -- callbacks --------------------------------------------------------------------
    def _on_dataset(self, update: bool = False):
        try:
            n = len(self.current_dataset())
        except Exception as err:  # noqa: BLE001 - shown to the user
            self._error(f"dataset {self.dataset.value!r}: {err}")
            return
        self.index.max = max(0, n - 1)
        if update:
            self.update()

    def on_upload(self, value) -> None:
        """Accept an upload (ipywidgets 8: a tuple of dicts with ``name`` and ``content``)."""
        files = list(value.values()) if isinstance(value, Mapping) else list(value)
        if not files:
            return
        f = files[-1]
        name = f.get("name", "upload") if isinstance(f, Mapping) else "upload"
        content = f.get("content") if isinstance(f, Mapping) else f
        try:
            self.uploaded = load_image_bytes(bytes(content), name)
        except ImageInputError as err:
            self.uploaded = None
            self._error(str(err))
            return
        self.update()

    def clear_upload(self) -> None:
        self.uploaded = None
        self.update()

    def _error(self, text: str) -> None:
        import html

        self.message.value = f"<span class='fl-error' style='color:#b00020'>{html.escape(text)}</span>"

    def update(self) -> PromptScores | None:
        """Re-score the current image with the current prompts and redraw; errors go to the message line."""
        try:
            prompts = parse_prompts(self.prompts.value)
            image = self.current_image()
        except Exception as err:  # noqa: BLE001 - the widget reports, the notebook keeps running
            self._error(str(err))
            return None
        try:
            result = score(self.current_model(), image, prompts)
        except Exception as err:  # noqa: BLE001
            self._error(f"checkpoint {self.checkpoint.value!r}: {err}")
            return None
        self.result = result
        self.message.value = ""
        self.probabilities.value = probability_html(result)
        try:
            fig = playground_figure(result)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=90)
        except Exception as err:  # noqa: BLE001 - drawing must not raise into the notebook either
            self._error(f"figure: {type(err).__name__}: {err}".strip())
            return result
        self.figure.value = buf.getvalue()
        return result

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
