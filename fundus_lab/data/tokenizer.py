"""A small WordPiece tokenizer for clinical fundus text.

Models start from random weights here (no model hub), so the vocabulary is learnt from our
own texts: the knowledge base (class names, synonyms, definitions, signs) plus the
training reports. It is saved with ``save_pretrained`` so that ``AutoTokenizer`` /
``PreTrainedTokenizerFast.from_pretrained`` load it like any Hugging Face tokenizer.

The vocabulary is built here, not by ``tokenizers``' WordPieceTrainer: that trainer breaks
ties between equally frequent merges in hash-map order, which changes from process to
process, so two fresh runs got different vocabularies (and Table 1 did not reproduce).
Ours is a pure function of the texts: every character (as a word start and as ``##``
continuation, so no corpus word is ever ``[UNK]``), then whole words by frequency, ties by
spelling. Loading never runs code (``trust_remote_code=False``; an ``auto_map`` is refused).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from fundus_lab import knowledge
from fundus_lab.checkpoint import CheckpointError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_vocab(texts: list[str], vocab_size: int, normalizer, pre_tokenizer) -> dict[str, int]:
    """A deterministic WordPiece vocabulary: specials, characters, then words.

    Characters come first (most frequent first, ties by code point) as word starts and as
    ``##`` continuations, so any corpus word can be spelt; the rest of the budget goes to
    whole words by frequency (ties by spelling). The same texts give the same ids in any
    process, on any machine.
    """
    words: Counter = Counter()
    for text in texts:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            words[word] += 1
    chars: Counter = Counter()
    for word, n in words.items():
        for ch in word:
            chars[ch] += n
    ordered = lambda counter: sorted(counter, key=lambda k: (-counter[k], k))  # noqa: E731
    vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    pieces = ordered(chars) + ["##" + c for c in ordered(chars)] + [w for w in ordered(words) if len(w) > 1]
    for piece in pieces:
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(piece, len(vocab))
    return vocab


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4000,
    out_dir: str | Path | None = None,
    model_max_length: int = 512,
) -> PreTrainedTokenizerFast:
    """Learn a BERT-style WordPiece vocabulary from ``texts``.

    Args:
        texts: the corpus, e.g. ``fundus_lab.knowledge.corpus() + reports``.
        vocab_size: upper bound on the vocabulary (a small corpus gives fewer tokens).
        out_dir: if given, the tokenizer is written there with ``save_pretrained``.
        model_max_length: the longest sequence the tokenizer will produce when truncating.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0-4)
        that wraps every text as ``[CLS] ... [SEP]``.
    """
    texts = [t for t in texts]
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"train_tokenizer: texts[{bad[0]}] is {type(texts[bad[0]]).__name__}, expected str")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("train_tokenizer: the corpus is empty; pass knowledge-base texts and/or reports")
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"train_tokenizer: vocab_size={vocab_size} is too small")

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    vocab = build_vocab(texts, vocab_size, normalizer, pre_tokenizer)
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix="##")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer directory written by :func:`train_tokenizer` (or any local HF tokenizer)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        raise FileNotFoundError(f"{path} holds no tokenizer (expected tokenizer.json or vocab.txt)")
    check_no_remote_code(path)
    _check_json_files(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except Exception as err:  # noqa: BLE001 -- the tokenizers library raises bare Exceptions on bad files
        raise CheckpointError(f"tokenizer {path} cannot be loaded ({type(err).__name__}: {err}); if one of its "
                              "files is damaged, restore the folder from a good copy of the checkpoint") from None
    missing = [name for name in ("pad_token", "cls_token", "mask_token") if getattr(tok, name) is None]
    if missing:
        raise ValueError(f"tokenizer {path}: no {', '.join(missing)}; fundus_lab needs [PAD], [CLS] and [MASK]")
    return tok


def _check_json_files(path: Path) -> None:
    """Every JSON file of a tokenizer folder parses (a truncated tokenizer.json is a
    :class:`CheckpointError` naming it, not the tokenizers library's bare Exception)."""
    for file in sorted(path.glob("*.json")):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{file}: not valid JSON ({err}); the tokenizer file is truncated or damaged: "
                                  "restore it from a good copy of the checkpoint (a run's own tokenizer is "
                                  "<run>/tokenizer/)") from None


def check_no_remote_code(path: str | Path) -> None:
    """Refuse a model/tokenizer folder that asks transformers to import its own Python
    (``auto_map`` in a config, or ``.py`` files beside it): loading must never run code."""
    path = Path(path)
    for name in ("tokenizer_config.json", "config.json", "special_tokens_map.json"):
        file = path / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{file}: not valid JSON ({err})") from None
        if isinstance(data, dict) and "auto_map" in data:
            raise CheckpointError(
                f"{file}: has an 'auto_map' ({data['auto_map']!r:.120}), which asks to run Python code shipped "
                "with the checkpoint; fundus_lab never runs checkpoint code (trust_remote_code=False)"
            )
    code = sorted(p.name for p in path.glob("*.py"))
    if code:
        raise CheckpointError(f"{path}: holds Python files {code}; a checkpoint must be data only (safetensors + JSON)")


def default_corpus(extra_texts: Iterable[str] = ()) -> list[str]:
    """The knowledge-base texts plus ``extra_texts`` (e.g. the training reports)."""
    return list(knowledge.corpus()) + [t for t in extra_texts if isinstance(t, str)]
