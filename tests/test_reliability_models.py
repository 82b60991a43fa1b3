"""Issue 10: the tokenizer is the same in every fresh run (item 6), loading never runs code
shipped with a checkpoint (item 7), and broken model checkpoints are CheckpointErrors that
name the file (item 16). Each failed before the fix."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fundus_lab.checkpoint import CheckpointError
from fundus_lab.data.tokenizer import load_tokenizer, train_tokenizer
from fundus_lab.models import MethodConfig, ModelConfig, build_model, load_model
from doubles import CLIP, CLIP_TEXTS as TEXTS, CLIP_TINY_PLAIN as TINY

REPO = Path(__file__).resolve().parent.parent


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------
# item 6: deterministic tokenizer training


def test_two_fresh_processes_train_byte_identical_tokenizers(tmp_path):
    """Each process has its own hash seeds (Python's and the Rust trainer's): the old
    WordPieceTrainer broke ties in hash-map order and differed from run to run."""
    script = (
        "import sys; from fundus_lab.data.tokenizer import default_corpus, train_tokenizer; "
        "train_tokenizer(default_corpus(['haemorrhages near the macula', 'a thin rim']), vocab_size=600, out_dir=sys.argv[1])"
    )
    outs = []
    for i, hash_seed in enumerate(("1", "2")):
        out = tmp_path / f"tok{i}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", script, str(out)], check=True, env=env, cwd=REPO, capture_output=True)
        outs.append(digests(out))
    assert outs[0] == outs[1] and "tokenizer.json" in outs[0]


def test_the_same_texts_give_the_same_vocabulary_in_one_process(tmp_path):
    a = train_tokenizer(TEXTS * 3, vocab_size=120, out_dir=tmp_path / "a")
    b = train_tokenizer(list(TEXTS * 3), vocab_size=120, out_dir=tmp_path / "b")
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    assert a.get_vocab() == b.get_vocab() and len(a) <= 120
    tokens = a.convert_ids_to_tokens(a("hard exudates cupmacula")["input_ids"])
    assert "exudates" in tokens and "[UNK]" not in tokens  # an unseen word is spelt in characters


# ---------------------------------------------------------------------------------------
# item 7: a tampered tokenizer config runs code


def tamper(folder: Path, marker: Path, config: str = "tokenizer_config.json") -> Path:
    cfg_path = folder / config
    data = json.loads(cfg_path.read_text())
    data["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None], "AutoConfig": "evil.EvilConfig"}
    cfg_path.write_text(json.dumps(data))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return cfg_path


def test_tokenizer_with_auto_map_is_refused_without_running_it(tmp_path):
    train_tokenizer(TEXTS, vocab_size=100, out_dir=tmp_path / "tok")
    marker = tmp_path / "ran.txt"
    cfg_path = tamper(tmp_path / "tok", marker)
    with pytest.raises(CheckpointError, match=rf"{cfg_path}: has an 'auto_map'"):
        load_tokenizer(tmp_path / "tok")
    assert not marker.exists()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "ckpt"
    tok = train_tokenizer(TEXTS * 2, vocab_size=150)
    build_model(ModelConfig(**TINY), MethodConfig(**CLIP), tok).save_pretrained(folder)
    return folder


def copy_of(folder: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(folder, dest)
    return dest


def test_model_checkpoint_with_a_tampered_tokenizer_is_refused(saved_model, tmp_path):
    ckpt = copy_of(saved_model, tmp_path / "m")
    marker = tmp_path / "ran.txt"
    cfg_path = tamper(ckpt / "tokenizer", marker)
    with pytest.raises(CheckpointError, match=rf"{cfg_path}: has an 'auto_map'"):
        load_model(ckpt)
    assert not marker.exists()


def test_text_pretrained_with_auto_map_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=60, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(str(bert))
    tok = train_tokenizer(TEXTS, vocab_size=60, out_dir=bert)
    cfg_path = tamper(bert, tmp_path / "ran.txt", config="config.json")
    with pytest.raises(CheckpointError, match=rf"{cfg_path}: has an 'auto_map'"):
        build_model(ModelConfig(**TINY, text_pretrained=str(bert)), MethodConfig(**CLIP), tok)
    assert not (tmp_path / "ran.txt").exists()


# ---------------------------------------------------------------------------------------
# item 16: broken model checkpoints


def test_truncated_weights_are_a_checkpoint_error(saved_model, tmp_path):
    ckpt = copy_of(saved_model, tmp_path / "m")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"{weights}: cannot be read as safetensors"):
        load_model(ckpt)


def test_unknown_text_model_type_is_a_checkpoint_error(saved_model, tmp_path):
    ckpt = copy_of(saved_model, tmp_path / "m")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["model_type"] = "no-such-transformer"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: text_config.model_type 'no-such-transformer' is not a transformers model type"):
        load_model(ckpt)



def test_outside_clip_folder_with_auto_map_is_refused(tmp_path):
    """fl.load_model of a Hugging Face CLIP folder (models/external/) checks the same way."""
    from transformers import CLIPConfig, CLIPModel

    from fundus_lab.models.external import load_external

    tok = train_tokenizer(TEXTS, vocab_size=100, model_max_length=16)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=8,
    )
    folder = tmp_path / "clip"
    CLIPModel(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    cfg_path = tamper(folder, tmp_path / "ran.txt")
    with pytest.raises(CheckpointError, match=rf"{cfg_path}: has an 'auto_map'"):
        load_external(folder)
    assert not (tmp_path / "ran.txt").exists()
