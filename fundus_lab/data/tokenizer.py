"""A small WordPiece tokenizer for clinical fundus text.

Models start from random weights here (no model hub), so the vocabulary is learnt from our
own texts: the knowledge base (class names, synonyms, definitions, signs) plus the
training reports. It is saved with ``save_pretrained`` so that ``AutoTokenizer`` /
``PreTrainedTokenizerFast.from_pretrained`` load it like any Hugging Face tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


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

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=1)
    tok.train_from_iterator(texts, trainer=trainer)
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
    tok = AutoTokenizer.from_pretrained(str(path))
    missing = [name for name in ("pad_token", "cls_token", "mask_token") if getattr(tok, name) is None]
    if missing:
        raise ValueError(f"tokenizer {path}: no {', '.join(missing)}; fundus_lab needs [PAD], [CLS] and [MASK]")
    return tok


def default_corpus(extra_texts: Iterable[str] = ()) -> list[str]:
    """The knowledge-base texts plus ``extra_texts`` (e.g. the training reports)."""
    from fundus_lab import knowledge

    return list(knowledge.corpus()) + [t for t in extra_texts if isinstance(t, str)]
