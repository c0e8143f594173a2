"""``train.reg_target: base``: a regularization image's loss target is the base model's own prediction.

kohya's prior preservation (``reg_data_dir``, ``prior_loss_weight``) trains the regularization
images like any other: their target is the noise (sd-scripts ``train_network.py``: the target is
``noise`` or the velocity for every image, the reg ones only weighted by ``prior_loss_weight``). Here the
target of a regularization item is what the model predicts with every LoRA module at multiplier 0
(the base model) for the same noisy latent, timestep and caption, with no gradient: the LoRA is trained
to leave the base's output on those captions unchanged. It is the idea of ai-toolkit's "differential output
preservation" (ostris/ai-toolkit ``extensions_built_in/sd_trainer/SDTrainer.py``: the prior prediction made
with the network's multiplier at 0 becomes the target of the preserved prompt), applied to the
regularization set. The base prediction is in the parameterisation of the model's own output (ε, v or a
flow's velocity), so it replaces the objective's target whatever the objective; min-SNR and the other
weightings apply to the loss as before.

At step 0 the LoRA's up weights are zero, so the LoRA's output is the base's and a regularization item's
loss is 0: its gradient grows only as the LoRA moves the base's predictions on known captions.
"""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def base_model(network):
    """Every module of ``network`` at multiplier 0 (the base model), then back to 1 (training's)."""
    network.set_multiplier(0.0)
    try:
        yield
    finally:
        network.set_multiplier(1.0)


def reg_rows(batch) -> list[int]:
    """Positions of the regularization items in a batch of (sample, repeat)."""
    return [i for i, (sample, _) in enumerate(batch) if sample.is_reg]


def _rows(value, idx):
    return {k: v[idx] for k, v in value.items()} if isinstance(value, dict) else value[idx]


def base_targets(target, rows: list[int], predict, network, noisy, t, hidden, added, autocast, base_cond=None):
    """``target`` with the rows ``rows`` (regularization items) replaced by the base model's
    prediction ``predict(noisy, t, hidden, added)`` of those rows, made under ``torch.no_grad()``
    with ``network`` at multiplier 0. ``base_cond`` (hidden, added): the base text encoders'
    conditioning when the text encoder trains (otherwise the batch's own serves: it is the base's)."""
    import torch

    if not rows:
        return target
    idx = torch.tensor(rows, device=noisy.device)
    if base_cond is not None:
        hidden, added = base_cond
    with torch.no_grad(), base_model(network), autocast:
        base = predict(noisy[idx], t[idx], hidden[idx], None if added is None else _rows(added, idx))
    out = target.clone()
    out[idx] = base.to(out.dtype)
    return out
