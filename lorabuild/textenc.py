"""Text conditioning for SD 1.x/2.x: tokenize to CLIP's 77 tokens, encode, apply clip_skip.

One function serves the text-embedding cache, training with a trained text encoder
and sampling, so a cached embedding equals what training would compute on the fly.
"""
from __future__ import annotations


def tokenize(tokenizer, captions: list[str]):
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode(tokenizer, text_encoder, captions: list[str], clip_skip: int = 1):
    """Hidden states ``[B, 77, D]`` for ``captions``.

    clip_skip = n uses the output of the n-th last layer, passed through the final
    layer norm (kohya ``train_util.get_hidden_states``; A1111 does the same).
    """
    ids = tokenize(tokenizer, captions).to(text_encoder.device)
    if clip_skip == 1:
        return text_encoder(ids)[0]
    out = text_encoder(ids, output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip]
    # transformers 5's CLIPTextModel has no `.text_model` level any more; 4's has.
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)
