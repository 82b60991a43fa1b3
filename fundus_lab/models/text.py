"""Text encoder E_text: a Hugging Face Transformer encoder (BERT by default).

Randomly initialised from a small ``BertConfig`` unless ``model.text_pretrained`` names a
local checkpoint directory. Shapes: ``input_ids``/``attention_mask`` ``[N, T]``; tokens
``[N, T, W_text]``; the pooled feature is the ``[CLS]`` token (position 0).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, BertConfig, BertModel, PretrainedConfig

from fundus_lab.data.tokenizer import check_no_remote_code


def small_bert_config(
    vocab_size: int, width: int, depth: int, heads: int, max_length: int, pad_token_id: int, dropout: float = 0.1
) -> BertConfig:
    if width % heads:
        raise ValueError(f"model.text_width={width} is not divisible by model.text_heads={heads}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.text_dropout={dropout} must be in [0, 1)")
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=4 * width,
        max_position_embeddings=max_length,
        pad_token_id=pad_token_id,
        type_vocab_size=1,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )


def config_from_dict(data: dict) -> PretrainedConfig:
    """Rebuild a saved HF config (``config.to_dict()``) without touching the original path."""
    data = dict(data)
    model_type = data.pop("model_type", "bert")
    if "auto_map" in data:  # a saved config that asks transformers to import checkpoint code
        raise ValueError(f"text_config has an 'auto_map' ({data['auto_map']!r:.80}); checkpoint code is never run")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as err:
        raise ValueError(f"text_config.model_type {model_type!r} is not a transformers model type ({err})") from None


def mask_tokens(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, ratio: float, mask_token_id: int, special_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace ``ratio`` of each text's ordinary tokens by ``[MASK]`` (at least one per text).

    Every chosen token becomes ``[MASK]`` (no BERT 80/10/10 split: the decoder, not the
    encoder, is what must learn the words, and a fixed count per text, as in MAE, keeps
    the loss scale steady across report lengths).

    Returns:
        masked_ids ``[N, T]``, targets ``[N, T]`` (the original id where masked, -100 elsewhere).
    """
    eligible = attention_mask.bool()
    for sid in special_ids:
        eligible &= input_ids != sid
    n_eligible = eligible.sum(dim=1)
    n_mask = torch.clamp((n_eligible.float() * ratio).round().long(), min=1)
    n_mask = torch.minimum(n_mask, n_eligible)
    noise = torch.rand(input_ids.shape, device=input_ids.device).masked_fill(~eligible, 2.0)
    rank = noise.argsort(dim=1).argsort(dim=1)  # rank of each position's noise in its row
    chosen = (rank < n_mask.unsqueeze(1)) & eligible
    masked_ids = input_ids.masked_fill(chosen, mask_token_id)
    targets = input_ids.masked_fill(~chosen, -100)
    return masked_ids, targets


class TextEncoder(nn.Module):
    """Wraps a HF encoder so the model sees ``forward(ids, mask) -> dict(tokens, cls)``."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        if isinstance(config, BertConfig):
            self.transformer = BertModel(config, add_pooling_layer=False)
        else:
            self.transformer = AutoModel.from_config(config, trust_remote_code=False)
        self._drop_pooler()
        self.width = config.hidden_size

    def _drop_pooler(self):
        # the [CLS] token is projected by our own head; an unused pooler would hold weights
        # that never train (and confuse the "every parameter trains" check)
        if getattr(self.transformer, "pooler", None) is not None:
            self.transformer.pooler = None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "TextEncoder":
        """Weights of a local checkpoint directory (safetensors only: no pickled ``.bin``)."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.text_pretrained={str(path)!r}: no config.json in that directory")
        if not any(path.glob("*.safetensors")):
            raise FileNotFoundError(
                f"model.text_pretrained={str(path)!r}: no *.safetensors weights (pickled checkpoints are not loaded)"
            )
        check_no_remote_code(path)
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
        enc = cls.__new__(cls)
        nn.Module.__init__(enc)
        enc.config = config
        enc.transformer = AutoModel.from_pretrained(str(path), use_safetensors=True, trust_remote_code=False,
                                                    local_files_only=True)
        enc._drop_pooler()
        enc.width = config.hidden_size
        return enc

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask)
        tokens = out.last_hidden_state  # [N, T, W_text]
        return {"tokens": tokens, "cls": tokens[:, 0], "attention_mask": attention_mask}
