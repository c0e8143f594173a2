"""``train.ema``: an exponential moving average of the adapter's trainable weights.

SimpleTuner (``--use_ema``, ``--ema_decay``, ``--ema_update_interval``), ai-toolkit
(``train.ema_config: {use_ema, ema_decay}``) and OneTrainer (``ema``, ``ema_decay``,
``ema_update_step_interval``) keep one; kohya's train_network.py does not. The shadow is fp32
whatever the training precision, on the device the weights train on, and only the trainable
tensors are averaged (a LoRA's alpha is a constant).

Update rule, after optimizer step ``s`` (1-based): up to ``update_after_step`` the shadow is
the weights themselves; after it, every ``every_n_steps``-th step is the k-th update,
``shadow ← d·shadow + (1 − d)·weights`` with ``d = min(decay, (1 + k) / (10 + k))``: the
warm-up of diffusers' ``EMAModel`` (its default, ``use_ema_warmup=False``; the formula from
tensorflow's ExponentialMovingAverage with ``num_updates``), so the early average is not held
at the random start for thousands of steps. No torch at module level: the schema and the
train key read the settings without it.
"""
from __future__ import annotations

import contextlib

SAVE_CHOICES = ("both", "ema")  # train.ema.save: which weights each saved epoch publishes


def decay_at(decay: float, k: int) -> float:
    """The decay of the ``k``-th update (1-based) with the warm-up: min(decay, (1 + k) / (10 + k))."""
    return min(decay, (1.0 + k) / (10.0 + k))


def keyed(ema: dict | None) -> dict | None:
    """The settings that shape the averaged weights (the train key): ``save`` only chooses what
    is published, so changing it re-publishes without training again."""
    if not ema:
        return ema
    return {k: v for k, v in ema.items() if k != "save"}


class AdapterEMA:
    """The fp32 shadow of ``params`` (the optimizer's tensors), named as ``network`` names them
    so that a training state saved by one run is read by the next."""

    def __init__(self, network, params: list, decay: float, update_after_step: int = 0, every_n_steps: int = 1):
        import torch

        wanted = {id(p) for p in params}
        self.params = {n: p for n, p in network.named_parameters() if id(p) in wanted}
        if len(self.params) != len(wanted):
            raise ValueError("train.ema: some trained tensors are not parameters of the network")
        self.decay, self.after, self.every = float(decay), int(update_after_step), int(every_n_steps)
        with torch.no_grad():
            self.shadow = {n: p.detach().to(torch.float32).clone() for n, p in self.params.items()}
        self.updates = 0  # k of the last update

    def update(self, step: int) -> None:
        """After optimizer step ``step``: follow the weights, or average them in (module docstring)."""
        import torch

        with torch.no_grad():
            if step <= self.after:
                for n, p in self.params.items():
                    self.shadow[n].copy_(p.detach())
                return
            if (step - self.after) % self.every:
                return
            self.updates += 1
            weight = 1.0 - decay_at(self.decay, self.updates)
            for n, p in self.params.items():
                self.shadow[n].lerp_(p.detach().to(torch.float32), weight)

    @contextlib.contextmanager
    def applied(self):
        """The network holds the averaged weights inside the block (to save or sample them), its
        own afterwards, bit for bit."""
        import torch

        with torch.no_grad():
            backup = {n: p.detach().clone() for n, p in self.params.items()}
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n])

    def state_dict(self) -> dict:
        return {"shadow": {n: t.detach().cpu().clone() for n, t in self.shadow.items()}, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        import torch

        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("train.ema: the training state's EMA does not hold this network's tensors")
        with torch.no_grad():
            for n, t in state["shadow"].items():
                self.shadow[n].copy_(t)
        self.updates = int(state["updates"])


def metadata(ema: dict) -> dict[str, str]:
    """The ``ss_*`` keys an EMA file carries beside kohya's (kohya has none for EMA): what it
    averages and how, so a reader can tell it from the raw weights of the same epoch."""
    return {"ss_ema": "true", "ss_ema_decay": str(ema["decay"]),
            "ss_ema_update_after_step": str(ema["update_after_step"]),
            "ss_ema_every_n_steps": str(ema["every_n_steps"]), "ss_ema_warmup": "min(decay, (1+k)/(10+k))"}
