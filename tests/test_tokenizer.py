"""The WordPiece tokenizer: trained on our texts, saved and reloaded like any HF tokenizer."""

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fundus_lab.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer

TEXTS = [
    "Moderate non-proliferative diabetic retinopathy with dot and blot haemorrhages.",
    "Hard exudates in a circinate ring around the macula.",
    "Glaucomatous cupping: enlarged cup, thin neuroretinal rim.",
    "Normal fundus. No haemorrhages, no exudates.",
]


def test_special_tokens_and_wrapping(tmp_path):
    tok = train_tokenizer(TEXTS, vocab_size=300, out_dir=tmp_path / "tok")
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.pad_token, tok.cls_token, tok.sep_token, tok.mask_token, tok.unk_token) == ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")
    ids = tok("Hard exudates near the macula")["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert "exudates" in tokens and "macula" in tokens  # whole corpus words are single tokens
    assert "[UNK]" not in tokens  # unseen words fall back to sub-words / characters
    assert len(tok) <= 300


def test_round_trip_through_save_pretrained(tmp_path):
    tok = train_tokenizer(TEXTS, vocab_size=300, out_dir=tmp_path / "tok")
    text = "Blot haemorrhages and a thin rim."
    for loaded in (load_tokenizer(tmp_path / "tok"), AutoTokenizer.from_pretrained(str(tmp_path / "tok")),
                   PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))):
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert loaded.mask_token_id == tok.mask_token_id
    batch = load_tokenizer(tmp_path / "tok")(["a", "hard exudates in a ring"], padding=True)
    assert batch["input_ids"][0][-1] == tok.pad_token_id and batch["attention_mask"][0][-1] == 0


def test_knowledge_corpus_trains_a_tokenizer():
    knowledge = pytest.importorskip("fundus_lab.knowledge")
    corpus = knowledge.corpus()
    tok = train_tokenizer(corpus, vocab_size=2000)
    assert tok.convert_ids_to_tokens(tok("microaneurysms")["input_ids"])[1:-1] == ["microaneurysms"]


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer(["", "  "])
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        train_tokenizer(["ok", None])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path / "empty")
