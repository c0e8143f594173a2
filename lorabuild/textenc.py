"""CLIP text encoding: tokenize to CLIP's 77 tokens in chunks, encode with clip_skip, join the chunks.

The model families (``lorabuild/families/``) build their conditioning from these: SD 1.x/2.x
encode with clip_skip, SDXL joins its two encoders' penultimate layers and adds the second
one's pooled projection. One function per family (``Family.condition``) serves the
text-embedding cache, training with a trained text encoder and sampling, so a cached
embedding equals what training would compute on the fly.
"""
from __future__ import annotations


def tokenize(tokenizer, captions: list[str], max_token_length: int = 75):
    """Token ids ``[B, n, 77]``: n = max_token_length / 75 chunks, each ``<BOS> 75 ids <EOS>``.

    kohya ``train_util.get_input_ids``: tokenize to max_token_length + 2, then cut the
    75 ids between the outer BOS/EOS into chunks and give each chunk its own BOS/EOS, so
    a 150- or 225-token caption is encoded whole instead of being cut at 75.
    """
    import torch

    width = tokenizer.model_max_length  # 77
    ids = tokenizer(captions, padding="max_length", max_length=max_token_length + 2, truncation=True,
                    return_tensors="pt").input_ids
    if max_token_length == width - 2:
        return ids.unsqueeze(1)
    bos, body, eos = ids[:, :1], ids[:, 1:-1], ids[:, -1:]
    chunks = [torch.cat([bos, body[:, i : i + width - 2], eos], dim=1) for i in range(0, max_token_length, width - 2)]
    return torch.stack(chunks, dim=1)


def encode(tokenizer, text_encoder, captions: list[str], clip_skip: int = 1, max_token_length: int = 75):
    """Hidden states ``[B, max_token_length + 2, D]`` for ``captions``.

    clip_skip = n uses the output of the n-th last layer, passed through the final
    layer norm (kohya ``train_util.get_hidden_states``; A1111 does the same). Chunks
    are encoded separately and joined as kohya does: the first BOS, each chunk's 75
    inner states, the last EOS.
    """
    from .precision import to_device

    ids = to_device(tokenize(tokenizer, captions, max_token_length), text_encoder.device)
    b, n, width = ids.shape
    flat = ids.reshape(b * n, width)
    if clip_skip == 1:
        hidden = text_encoder(flat)[0]
    else:
        out = text_encoder(flat, output_hidden_states=True)
        # transformers 5's CLIPTextModel has no `.text_model` level any more; 4's has.
        hidden = getattr(text_encoder, "text_model", text_encoder).final_layer_norm(out.hidden_states[-clip_skip])
    return join_chunks(hidden.reshape(b, n, width, -1))


def join_chunks(hidden):
    """``[B, n, 77, D]`` chunk outputs → ``[B, n·75 + 2, D]``: the first BOS, each chunk's 75 inner states, the last EOS."""
    import torch

    n = hidden.shape[1]
    if n == 1:
        return hidden[:, 0]
    parts = [hidden[:, 0, :1]] + [hidden[:, i, 1:-1] for i in range(n)] + [hidden[:, -1, -1:]]
    return torch.cat(parts, dim=1)
