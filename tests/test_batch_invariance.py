"""Batch-invariant embeddings (issue 17, item 3): in eval mode a sample's ``encode_text`` and
``encode_image`` output is the same whatever its batch size, order and batch-mates, for every
method config in configs/methods and both outside-model kinds (open_clip, Hugging Face CLIP).

Zero-shot scores prompts in one batch and images in others; an embedding that moved with
its batch-mates (CoCa's CLS appended at the batch's padded length did) would make every
zero-shot number depend on the batch size."""

import pytest
import torch

from fundus_lab.models import load_model
from fundus_lab.models.objectives import CoCaCaption, TextPass
from doubles import METHODS, TEXTS, tiny_model

# texts of very different lengths, so that padding to the longest changes with the batch
SAMPLE_TEXTS = ["glaucoma", TEXTS[1], TEXTS[0] + ", hard exudates near the macula and a few cotton wool spots", TEXTS[3]]
TEXT_MATES = ["dr", "a long report: " + ", ".join(TEXTS) + ", and more haemorrhages in every quadrant of the retina"]
TOLERANCE = 1e-5  # float rounding of differently shaped matrix products; a moved embedding is off by > 1e-2


def _images(seed: int, n: int, size: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.rand(n, 3, size, size, generator=g))


def _stack(items):
    return list(items) if isinstance(items[0], str) else torch.stack(list(items))


def assert_batch_invariant(encode, samples: list, mates: list, what: str) -> None:
    """``encode`` of each sample alone equals its row in the batch, the reversed batch and the
    batch with mates before and after it (several batch sizes among them)."""
    with torch.no_grad():
        alone = torch.cat([encode(_stack(samples[i:i + 1])) for i in range(len(samples))])
        batches = {
            "the whole batch": encode(_stack(samples)),
            "the reversed batch": encode(_stack(samples[::-1])).flip(0),
            "a batch with mates around it": encode(_stack(mates[:1] + samples + mates[1:]))[1:1 + len(samples)],
            "pairs": torch.cat([encode(_stack(samples[i:i + 2])) for i in range(0, len(samples), 2)]),
        }
    for how, out in batches.items():
        diff = (out - alone).abs().max().item()
        assert diff <= TOLERANCE, f"{what}: in {how} the embeddings differ from each sample alone by up to {diff:.2e}"


@pytest.fixture(scope="module")
def tokenizer():
    from fundus_lab.data.tokenizer import train_tokenizer

    return train_tokenizer(SAMPLE_TEXTS + TEXT_MATES + TEXTS, vocab_size=200)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_embeds_each_sample_whatever_its_batch(name, tokenizer):
    model = tiny_model(name, tokenizer).eval()
    assert_batch_invariant(model.encode_image, _images(0, 4), _images(1, 2), f"{name} encode_image")
    if "text_embedding" in model.capabilities:
        assert_batch_invariant(model.encode_text, SAMPLE_TEXTS, TEXT_MATES, f"{name} encode_text")


@pytest.fixture(scope="module")
def outside_models(tmp_path_factory):
    """The two outside-model kinds, saved by test_external_models' helpers and loaded as
    evaluation loads them."""
    pytest.importorskip("open_clip", reason="open_clip not installed (pip install 'fundus_lab[external]')")
    from doubles import save_tiny_hf_clip, save_tiny_open_clip

    open_clip_dir, hf_dir = tmp_path_factory.mktemp("open_clip"), tmp_path_factory.mktemp("hf_clip")
    save_tiny_open_clip(open_clip_dir)
    save_tiny_hf_clip(hf_dir)
    return {"open_clip": load_model(open_clip_dir), "hf": load_model(hf_dir)}


@pytest.mark.parametrize("kind", ["open_clip", "hf"])
def test_outside_models_embed_each_sample_whatever_its_batch(kind, outside_models):
    model = outside_models[kind]
    assert_batch_invariant(model.encode_image, _images(0, 4), _images(1, 2), f"{kind} encode_image")
    assert_batch_invariant(model.encode_text, SAMPLE_TEXTS, TEXT_MATES, f"{kind} encode_text")


def test_coca_cls_reads_what_open_clips_fixed_context_cls_reads(tokenizer):
    """Padding every text to the full context (open_clip's fixed ``context_length``) gives the
    same CLS as padding to the batch's longest: the CLS sits at the context's end either way."""
    model = tiny_model("coca", tokenizer).eval()
    ids, attn = model.tokenize(SAMPLE_TEXTS)
    t_max = model.text_encoder.max_length
    pad = tokenizer.pad_token_id
    full_ids = torch.cat([ids, ids.new_full((ids.shape[0], t_max - ids.shape[1]), pad)], dim=1)
    full_attn = torch.cat([attn, attn.new_zeros(attn.shape[0], t_max - attn.shape[1])], dim=1)
    with torch.no_grad():
        short, full = model.text_encoder(ids, attn), model.text_encoder(full_ids, full_attn)
    assert ids.shape[1] < t_max
    torch.testing.assert_close(short["cls"], full["cls"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(short["tokens"][attn.bool()], full["tokens"][:, : ids.shape[1]][attn.bool()], atol=TOLERANCE, rtol=0)


def test_coca_trains_the_contrastive_term_on_the_embedding_encode_text_gives(tokenizer):
    """As open_clip's CoCa.forward: the CLS of the training pass reads the whole text (the
    longest text in the batch keeps its last token); only the captioner's inputs are cut."""
    model = tiny_model("coca", tokenizer).eval()
    with torch.no_grad():
        enc = model.encode_passes({"image": torch.stack(_images(0, 4)), "text": SAMPLE_TEXTS}, model.passes())
        trained = torch.nn.functional.normalize(model.text_proj(model.text_embedding_input(enc[TextPass()])), dim=-1)
        torch.testing.assert_close(trained, model.encode_text(SAMPLE_TEXTS), atol=TOLERANCE, rtol=0)
    ids, _ = model.tokenize(SAMPLE_TEXTS)
    caption = next(h for h in model.objectives if isinstance(h, CoCaCaption))
    tokens, _, targets = caption.teacher_forcing(enc)
    assert tokens.shape[1] == ids.shape[1] - 1 == targets.shape[1]  # teacher forcing: ids[:-1] -> ids[1:]
