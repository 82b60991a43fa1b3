"""Configs: YAML files under ``configs/`` mapped onto dataclasses.

A run's config is built in layers, each one a plain dict of sections:

    dataclass defaults  <-  configs/presets/<preset>.yaml  <-  configs/methods/<method>.yaml
                        <-  a user YAML file (optional)     <-  ``key=value`` overrides

Every key is checked against the dataclass fields, so a typo is an error that names
the key, where it came from, and the close matches, never a silently ignored setting.
The checking (:func:`fundus_lab.schema.coerce`, :func:`~fundus_lab.schema.build_dataclass`)
is shared with the dataset manifests (``fundus_lab.data.manifest``) and lives in
:mod:`fundus_lab.schema`; this module holds the sections and how they are loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from fundus_lab.names import check_name
from fundus_lab.schema import (ConfigError, OverrideText, SchemaError, build_dataclass, coerce_text, did_you_mean,
                               to_dict)

PACKAGE_ROOT = Path(__file__).resolve().parent
# shipped inside the package (``configs/`` at the checkout root is a link to it), so a plain
# ``pip install .`` finds presets and methods; FUNDUS_LAB_CONFIGS points elsewhere
CONFIG_DIR = Path(os.environ.get("FUNDUS_LAB_CONFIGS", PACKAGE_ROOT / "configs"))
PRESETS = ("smoke", "default", "paper")
DEFAULT_METHOD = "ours"  # the method a config gets when none is named


# ---------------------------------------------------------------------------------------
# the sections (every schema lives here; this module imports only fundus_lab.schema)


@dataclass
class ModelConfig:
    """Sizes of the two branches, the fusion and the decoders.

    ``text_pretrained`` is a local Hugging Face checkpoint directory for the text encoder
    (its width then wins over ``text_width``/``text_depth``/``text_heads``);
    ``tokenizer`` a tokenizer directory (default: the checkpoint's own tokenizer, else one
    trained on the knowledge base with ``vocab_size`` tokens at most).
    """

    img_size: int = 224
    patch_size: int = 16
    vision_width: int = 192
    vision_depth: int = 12
    vision_heads: int = 3
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    text_width: int = 192
    text_depth: int = 4
    text_heads: int = 3
    text_max_length: int = 192  # fits the longest synthetic "both" text (definitions + report, 154 tokens measured)
    text_pretrained: Optional[str] = None
    tokenizer: Optional[str] = None
    # the text feature the contrastive projection reads: "cls" (the [CLS] token, BERT-style)
    # or "mean" (the mean of the non-padding tokens, as FLAIR pools its BERT)
    text_pooling: Literal["cls", "mean"] = "cls"
    # the BERT text tower's dropout (hidden states and attention probabilities): 0.1 is
    # BertConfig's default; CLIP's and EVA-CLIP's text Transformers have none (clip.yaml, eva.yaml)
    text_dropout: float = 0.1
    vocab_size: int = 4000
    embed_dim: int = 256
    fusion_depth: int = 1
    fusion_heads: int = 3
    decoder_width: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    text_decoder_depth: int = 1
    caption_depth: int = 2
    # image tower: "vit" (the ViT above, made by timm) or any timm model name ("vit_base_patch16_224",
    # "resnet50"); image_weights: a timm or RETFound .safetensors/.pth/.bin file loaded into it
    image_encoder: str = "vit"
    image_weights: Optional[str] = None


@dataclass
class MethodConfig:
    """What is learned: which loss terms, with which weights, and which modules exist.

    A weight of 0 switches a term off and its modules are not built (honest parameter
    counts and speed). ``L_total = contrastive_weight * L_con + image_gen_weight * L_img
    + caption_weight * L_cap`` (eq. 8). ``docs/fidelity.md`` maps every switch to the
    paper or baseline it follows.

    - ``contrastive_loss``: ``infonce`` (CLIP, eq. 2), ``label_aware`` (FLAIR: pairs that
      share a category are positives) or ``vilref`` (weighted similarity coupling with
      momentum encoders and a memory queue of ``queue_size``; needs ``num_labels``).
    - ``contrastive_view``: ``full`` (the paper's eq. 1: one unmasked pass of each encoder
      feeds the contrastive term; masked passes feed the decoders) or ``masked`` (FLIP: the
      image masked at ``contrastive_mask_ratio`` feeds it; the ``ours-flip`` variant).
    - ``contrastive_directions``: ``symmetric`` (CLIP) or ``image_to_text`` (eq. 2 as written).
    - ``image_gen_target``: ``pixels`` (MAE, eqs. 3-4) or ``teacher`` features (EVA) of a
      frozen image encoder from ``teacher_checkpoint`` (a saved CLIP model dir).
    - ``mim_masking``: ``random`` (MAE: masked patches are dropped from the encoder) or
      ``block`` (BEiT/EVA: block-wise masks, masked patches replaced by a learnt [MASK]
      token inside the encoder).
    - ``stage1_fraction``: > 0 splits the run in two stages (EVA-CLIP): the first
      ``stage1_fraction`` of the steps train masked image modelling only, the rest the
      contrastive term only, from the same encoder. The total images seen stay the budget.
    - ``caption_mode``: ``masked`` (eqs. 5-6: the masked text through ``E_text``, a decoder
      rebuilds the sequence) or ``autoregressive`` (CoCa: one causal text stack, unimodal
      then multimodal layers cross-attending to attention-pooled image tokens).
    - ``caption_targets``: ``all`` (eq. 6: cross-entropy over all T tokens) or ``masked``
      (only the masked positions, BERT/MLM-style).
    - ``cross_attention``: fuse image and text tokens before the decoders (eq. 7).
    - ``labels_from``: which labels the label-aware losses read: ``ground_truth`` (the
      dataset's) or ``report_keywords`` (ViLReF: extracted from each report by the
      knowledge base's keyword rules).
    - ``text_init``: where the text tower (encoder and projection) starts: ``random`` or
      ``teacher`` (EVA-CLIP: copied from the CLIP ``teacher_checkpoint``'s text tower).
    """

    name: str = "ours"
    contrastive_weight: float = 1.0
    contrastive_loss: Literal["infonce", "label_aware", "vilref"] = "infonce"
    contrastive_view: Literal["full", "masked"] = "full"
    contrastive_mask_ratio: float = 0.5
    contrastive_directions: Literal["symmetric", "image_to_text"] = "symmetric"
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    image_gen_weight: float = 1.0
    image_gen_target: Literal["pixels", "teacher"] = "pixels"
    mask_ratio: float = 0.75
    mim_masking: Literal["random", "block"] = "random"
    norm_pix_loss: bool = True
    teacher_checkpoint: Optional[str] = None
    teacher_loss: Literal["cosine", "smooth_l1"] = "cosine"
    stage1_fraction: float = 0.0
    caption_weight: float = 1.0
    caption_mode: Literal["masked", "autoregressive"] = "masked"
    caption_targets: Literal["all", "masked"] = "all"
    text_mask_ratio: float = 0.15
    cross_attention: bool = True
    momentum: float = 0.995
    queue_size: int = 1024
    num_labels: int = 8
    labels_from: Literal["ground_truth", "report_keywords"] = "ground_truth"
    coca_pool_queries: int = 16
    text_init: Literal["random", "teacher"] = "random"

    # What the switches mean, answered once (the model, its heads and the trainer ask these).
    @property
    def uses_contrastive(self) -> bool:
        """The contrastive term (eq. 2) trains: a joint image-text space."""
        return self.contrastive_weight > 0

    @property
    def uses_image_decoder(self) -> bool:
        """The image-generation term trains (eqs. 3-4, or EVA's teacher-feature regression)."""
        return self.image_gen_weight > 0

    @property
    def uses_caption(self) -> bool:
        """A caption term trains (eqs. 5-6, or CoCa's)."""
        return self.caption_weight > 0

    @property
    def uses_text(self) -> bool:
        """The method has a text branch (a contrastive or caption term); else image-only (MAE)."""
        return self.uses_contrastive or self.uses_caption

    @property
    def uses_teacher(self) -> bool:
        """Image generation regresses a frozen teacher's features (EVA) instead of pixels."""
        return self.uses_image_decoder and self.image_gen_target == "teacher"

    @property
    def uses_coca(self) -> bool:
        """Captioning is CoCa's: one causal text stack, unimodal then multimodal layers."""
        return self.uses_caption and self.caption_mode == "autoregressive"

    @property
    def uses_masked_caption(self) -> bool:
        """Captioning rebuilds the text from its masked copy (eqs. 5-6)."""
        return self.uses_caption and self.caption_mode == "masked"

    @property
    def uses_cross_attention(self) -> bool:
        """Image and text tokens are fused before the decoders (eq. 7)."""
        return self.cross_attention and self.uses_text


@dataclass
class DataConfig:
    """Which dataset a run pretrains on and how images are prepared.

    ``dataset`` is a manifest name from ``data_manifests/`` or a path to a manifest file.
    With ``root`` unset and a synthetic dataset named, the synthetic benchmark is written
    under ``synth_root`` on first use (``synth_n`` images per task, seed ``synth_seed``).
    """

    dataset: str = "synth-pretrain"
    root: Optional[str] = None
    image_size: int = 224
    num_workers: int = 0
    augment: bool = True
    text_source: str = "definitions"
    text_per_image: str = "all_labels"
    synth_root: str = "data/synth"
    synth_n: int = 2000
    synth_eval_n: int = 600
    synth_seed: int = 0
    synth_image_size: int = 224
    # generator calibration (1.0 = realistic; see fundus_lab.data.synth.render.calibration):
    # a low working resolution enlarges and deepens small lesions and softens the camera shift
    synth_lesion_scale: float = 1.0
    synth_lesion_contrast: float = 1.0
    synth_camera_shift: float = 1.0
    skip_bad_images: bool = False
    # pre-decoded, pre-resized uint8 images in a memory-mapped file per dataset/split/size
    # (fundus_lab.data.cache), written on first use under image_cache_dir
    image_cache: bool = True
    image_cache_dir: Optional[str] = None   # None: <dataset folder>/.cache


@dataclass
class EvalConfig:
    """Which protocols run on which datasets, with how many seeds and how much training.

    Seeds: every method is pretrained once per ``pretrain_seeds`` entry; each pretrained
    model is then evaluated with ``seeds`` few-shot draws and ``fine_tune_seeds``
    fine-tuning runs. Table 1 reports mean ± std over all runs of a cell.
    """

    zero_shot_dataset: str = "synth-odir"
    unseen_dataset: str = "synth-unseen"  # diseases no pretraining text names (Table 2's unseen column)
    few_shot_dataset: str = "synth-fives"
    fine_tune_dataset: str = "synth-aptos"
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    seeds: int = 5
    batch_size: int = 64
    bootstrap: int = 1000
    pretrain_seeds: list[int] = field(default_factory=lambda: [0])
    # few-shot
    few_shot_k: Optional[int] = None  # the k shown in Table 1 (None: the largest of `shots`)
    few_shot_features: Literal["cls", "embed"] = "cls"
    few_shot_head_steps: int = 100
    # few-shot fine-tuning (Table 1's few-shot, the paper's protocol): the fine_tune_* recipe on
    # k images per class; an epoch is one pass over the k-shot set (one or two steps), so more of them
    few_shot_epochs: int = 30
    few_shot_patience: int = 10
    few_shot_fine_tune_seeds: Optional[int] = None  # k-shot draws fine-tuned per k (None: `seeds`, as the probe)
    # fine-tuning
    fine_tune_seeds: int = 3
    fine_tune_epochs: int = 10
    fine_tune_lr: float = 5e-4
    fine_tune_layer_decay: float = 0.75
    fine_tune_weight_decay: float = 0.05
    fine_tune_batch_size: int = 32
    fine_tune_patience: int = 3
    fine_tune_class_balanced: bool = False
    fine_tune_augment: bool = True
    # bookkeeping
    output_dir: str = "runs/compare/{preset}"  # {preset} filled in: presets never share run folders
    cache_features: bool = True
    progress: bool = True  # tqdm bars (feature batches, few-shot seeds, fine-tune epochs) on the main process


def log_with_from_alias(tensorboard: Optional[bool], log_with: Optional[str]) -> str:
    """``train.log_with`` given the deprecated ``train.tensorboard`` beside it: false always
    means no tracker, true keeps ``log_with`` (tensorboard unless set); ``None`` (``log_with=none``
    typed on the command line parses as null) is ``"none"``."""
    if tensorboard is False or log_with is None:
        return "none"
    return log_with


def _fold_deprecated(layer: dict) -> dict:
    """One config layer with ``train.tensorboard`` rewritten as ``train.log_with``, so a later
    layer's alias overrides an earlier layer's ``log_with`` (``train.tensorboard=true`` on the
    smoke preset turns TensorBoard back on)."""
    train = layer.get("train")
    if not isinstance(train, dict) or "tensorboard" not in train:
        return layer
    train = dict(train)
    alias = train.pop("tensorboard")
    if isinstance(alias, OverrideText):  # typed before it is read (the layer is checked by from_dict too)
        alias = coerce_text(alias, Optional[bool], ("train", "tensorboard"))
    if alias is not None:
        train["log_with"] = log_with_from_alias(alias, train.get("log_with", "tensorboard"))
    return {**layer, "train": train}


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping for ``fundus_lab.train.pretrain``."""

    steps: int = 1000
    batch_size: int = 32
    grad_accum_steps: int = 1
    lr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 100
    clip_grad_norm: Optional[float] = 1.0
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    seed: int = 0
    log_every: int = 10
    save_every: int = 200
    keep_checkpoints: int = 2
    output_dir: str = "runs/pretrain"
    # experiment tracker, through accelerate: tensorboard writes <run>/tensorboard/; wandb and
    # mlflow need their own package installed (pip install wandb / pip install mlflow); null = none
    log_with: Optional[Literal["tensorboard", "wandb", "mlflow", "none"]] = "tensorboard"
    # deprecated alias of log_with, kept so old configs and the configs saved in old checkpoints
    # load: true -> log_with tensorboard (unless log_with is set), false -> log_with none
    tensorboard: Optional[bool] = None
    progress: bool = True
    # run-to-run repeatability: float sums depend on how work is split over threads, so the
    # thread count is part of the config (not the machine's default); 0 = leave torch's choice
    num_threads: int = 2
    deterministic: bool = True  # torch.use_deterministic_algorithms (warn-only where none exists)
    # torch.compile the image encoder in place (state-dict keys unchanged). Off by default: its
    # kernels round differently from eager (not bit-identical to a run without it) and on the
    # 2-core CPU the compiled step measured 11 % slower (results/benchmarks/compile.md)
    compile: bool = False
    # what "the same budget" means across methods (fundus_lab.budget): `steps`, every method
    # trains `steps` steps (the paper's reading); `flops`, each method's steps are set by
    # resolve_config so its training FLOPs (EVA: both stages and its CLIP teacher) equal those of
    # `budget_method` at `steps`
    budget: Literal["steps", "flops"] = "steps"
    budget_method: str = "ours"
    # steps of the CLIP teacher a teacher-target method (EVA) trains first; None = train.steps
    # (the clip row's own checkpoint). Set by resolve_config under budget=flops
    teacher_steps: Optional[int] = None

    def __post_init__(self):
        # the alias is folded into log_with at once, so nothing downstream reads two keys
        self.log_with = log_with_from_alias(self.tensorboard, self.log_with)
        self.tensorboard = None


@dataclass
class Config:
    """The whole run: what to learn (method), with what (model), on what (data), how (train)."""

    preset: str = "default"
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return to_dict(self)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        keys.append(name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], name + "."))
    return keys


def _config_error(err: SchemaError, cls: type, source: str) -> ConfigError:
    """A :class:`SchemaError` in the words of config files: ``source: train.steps = 'x' is not a valid int``."""
    key, value, tp = err.field, err.value, err.expected
    if err.problem == "unknown":
        # nested sections are always parts of a whole Config: suggest across all its sections
        known = _all_keys(Config) if len(err.path) > 1 else _all_keys(cls)
        name = str(err.key)
        # a right name under the wrong section first, then spelling neighbours
        same_name = [k for k in known if k.rsplit(".", 1)[-1] == name]
        spelled = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        close = list(dict.fromkeys(same_name + spelled))[:3]
        return ConfigError(f"{source}: unknown config key {key!r}{did_you_mean(close)}")
    if err.problem == "missing":
        return ConfigError(f"{source}: {key + ': ' if key else ''}missing required field(s) {list(err.missing)}")
    if err.problem == "length":
        return ConfigError(f"{source}: {key} needs {len(typing.get_args(tp))} values, got {value!r}")
    if err.problem == "finite":
        return ConfigError(f"{source}: {key} = {value!r}; expected a finite number (inf and nan are refused)")
    if typing.get_origin(tp) is Literal:
        return ConfigError(f"{source}: {key} = {value!r}; expected one of {list(typing.get_args(tp))}")
    if dataclasses.is_dataclass(tp):
        return ConfigError(f"{source}: {key} must be a mapping of {tp.__name__} fields, got {value!r}")
    return ConfigError(f"{source}: {key} = {value!r} is not a valid {getattr(tp, '__name__', tp)}")


def from_dict(cls: type, data: dict, source: str = "<dict>", prefix: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are errors.

    ``prefix`` (``"model."``) is where ``data`` sits in a whole config, for the messages.
    """
    path = tuple(p for p in prefix.split(".") if p)
    try:
        return build_dataclass(cls, data or {}, path, lenient=True)
    except SchemaError as err:
        raise _config_error(err, cls, source) from None


def merge(base: dict, update: dict) -> dict:
    """Deep-merge ``update`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], "OverrideText"]:
    """``"train.lr=1e-3"`` -> (["train", "lr"], OverrideText("1e-3")): the value stays text,
    typed later by its field's schema (:func:`coerce_text`), never read as YAML blindly."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key.split("."), OverrideText(raw)


def overrides_to_dict(overrides: list[str] | dict | None) -> dict:
    """Turn ``["a.b=1", ...]`` (or ``{"a.b": 1}`` from notebook parameters) into a nested dict."""
    if not overrides:
        return {}
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    nested: dict = {}
    for key, value in items:
        parts = key.split(".") if isinstance(key, str) else key
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {'.'.join(parts)} conflicts with another override")
        node[parts[-1]] = value
    return nested


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
    return data


def _named_file(kind: str, name: str) -> Path:
    check_name(name, f"{kind[:-1]} name")  # "../x" must not read a YAML file outside configs/
    path = CONFIG_DIR / kind / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known)}"
        raise ConfigError(f"no {kind[:-1]} named {name!r} in {CONFIG_DIR / kind}{hint}")
    return path


def resolve_path(path: str | Path) -> Path:
    """The one rule for relative paths (``data.synth_root``, ``train.output_dir``, run and data
    folders) in every command and notebook: relative to the current working directory, as for
    any command-line tool, never to the package's checkout. Made absolute at once, so what a
    path means cannot change later (a notebook kernel started in another folder gets absolute
    paths from ``reproduce``)."""
    return Path(path).expanduser().absolute()


def available_methods() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "methods").glob("*.yaml"))


def load_config(
    path: str | Path | None = None,
    *,
    preset: str | None = None,
    method: str | None = None,
    overrides: list[str] | dict | None = None,
) -> Config:
    """Compose a :class:`Config` from a preset, a method and overrides.

    Args:
        path: optional user YAML; it may name ``preset:`` and ``method:`` itself
            (``method`` as a name of ``configs/methods/*.yaml``) and hold any sections.
        preset: ``smoke`` | ``default`` | ``paper`` (wins over the file's ``preset``).
        method: a method name (wins over the file's ``method`` name); none named anywhere
            means ``ours`` (:data:`DEFAULT_METHOD`).
        overrides: ``["train.steps=10", ...]`` or ``{"train.steps": 10}``.
    """
    user = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<config>"
    user_method = user.pop("method", None)
    if isinstance(user_method, str):
        method = method or user_method
        user_method = None
    over = overrides_to_dict(overrides)
    over_method = over.get("method")
    if isinstance(over_method, str):  # "method=clip" picks a method file
        method = str(over.pop("method"))
    if not method and user_method is None and (CONFIG_DIR / "methods" / f"{DEFAULT_METHOD}.yaml").is_file():
        method = DEFAULT_METHOD  # `fundus-lab pretrain` without --method is `--method ours`
    preset = str(over.pop("preset", None) or preset or user.pop("preset", None) or "default")
    user.pop("preset", None)

    layers: list[tuple[str, dict]] = [(str(_named_file("presets", preset)), read_yaml(_named_file("presets", preset)))]
    if method:
        method_path = _named_file("methods", method)
        layers.append((str(method_path), read_yaml(method_path)))
    if user_method:
        user["method"] = user_method
    if user:
        layers.append((source, user))
    if over:
        layers.append(("<overrides>", over))

    merged: dict = {}
    for src, layer in layers:
        layer = {k: v for k, v in layer.items() if k != "preset"}
        from_dict(Config, layer, src)  # validate each layer against the schema, naming its file
        merged = merge(merged, _fold_deprecated(layer))
    cfg = from_dict(Config, merged, source)
    cfg.preset = preset
    if method:
        cfg.method.name = method
    return cfg


BUDGET_KEYS = ("steps", "batch_size", "grad_accum_steps")


def resolve_config(
    preset: str | None = None,
    method: str | None = None,
    overrides: list[str] | dict | None = None,
    *,
    path: str | Path | None = None,
    seed: int | None = None,
    run_dir: str | Path | None = None,
    synth_root: str | Path | None = None,
) -> Config:
    """The config of one run of ``method``: the one function notebooks, ``compare`` and
    ``reproduce`` call, so an override reaches every one of them identically.

    Layers: preset <- method file <- user file <- overrides (:func:`load_config`). Then the
    run's own facts: the pretraining budget (``train.steps``, ``batch_size``,
    ``grad_accum_steps``) is the preset's plus overrides whatever a method file says, so
    every method sees the same number of images; ``seed`` (default the first of
    ``eval.pretrain_seeds``) becomes ``train.seed``; with ``run_dir`` the pretraining run
    lives in ``run_dir/pretrain/<method>/seed<s>``; ``synth_root`` moves the synthetic data.
    The steps of an equal-FLOPs budget (``train.budget: flops``) need models built to count
    them: :func:`fundus_lab.experiment.configs.resolve_run_config` adds them above this level.
    """
    cfg = load_config(path, preset=preset, method=method, overrides=overrides)
    if method is not None:
        shared = load_config(path, preset=cfg.preset, overrides=overrides)
        for key in BUDGET_KEYS:
            setattr(cfg.train, key, getattr(shared.train, key))
    if not cfg.eval.pretrain_seeds:
        raise ConfigError("eval.pretrain_seeds is empty; give at least one seed (e.g. eval.pretrain_seeds=[0])")
    cfg.train.seed = int(cfg.eval.pretrain_seeds[0] if seed is None else seed)
    if synth_root is not None:
        cfg.data.synth_root = str(synth_root)
    if run_dir is not None and method is not None:
        cfg.train.output_dir = str(Path(run_dir) / "pretrain" / method / f"seed{cfg.train.seed}")
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
