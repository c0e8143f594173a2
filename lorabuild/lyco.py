"""LyCORIS network types (``network.type: loha | lokr | dora``) on the ``lycoris-lora`` package.

The modules are LyCORIS' own (``lycoris.modules``); lorabuild picks the targets and names them
as for its LoRA (``network._candidates``: kohya names, SGM names for SDXL), so the file has
the layout kohya's ``lycoris.kohya`` writes and A1111, ComfyUI and Forge load:
``<lora_unet_…>.hada_w1_a/_w1_b/_w2_a/_w2_b`` (+ ``hada_t1/t2`` with Tucker) for LoHa,
``.lokr_w1`` or ``.lokr_w1_a/_b`` and ``.lokr_w2`` or ``.lokr_w2_a/_b`` (+ ``lokr_t2``) for
LoKr, ``.lora_down/.lora_up.weight`` + ``.dora_scale`` for DoRA, and ``.alpha`` for all.

``merged_weight`` is lorabuild's own reading of such a file (the arithmetic ComfyUI's
``weight_adapter`` and A1111's ``lyco`` code apply, from their sources): a merged layer weight
from the saved tensors alone, with no LyCORIS import. The tests hold it against the library.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from .network import LoRANetwork, NetworkConfigError, check_layout

from .lyco_options import OPTION_DEFAULTS, OPTIONS, option_problems


def module_maker(net: dict):
    """``make(name, module, dim, alpha)`` for LoRANetwork: the LyCORIS module of ``net['type']``."""
    from lycoris.modules import LoConModule, LohaModule, LokrModule

    kind = net["type"]
    cls = {"loha": LohaModule, "lokr": LokrModule, "dora": LoConModule}[kind]
    kw = {arg: net.get(key, OPTION_DEFAULTS[key]) for key, (arg, types) in OPTIONS.items() if kind in types}
    if kind == "dora":
        kw["weight_decompose"] = True
    problems = option_problems(net)
    if problems:
        raise NetworkConfigError("{}.{}: {}".format(*problems[0]))

    def make(name, module, dim, alpha):
        # bypass_mode False: the weight-rebuild forward (W + ΔW), the one every type and DoRA share
        return cls(name, module, 1.0, dim, alpha, 0.0, net.get("rank_dropout") or 0.0,
                   net.get("module_dropout") or 0.0, bypass_mode=False, **kw)
    return make


class LycoNetwork(LoRANetwork):
    """LoRANetwork's targets, names, parts and rates, with LyCORIS modules in them."""

    def module_params(self, m) -> list:
        return list(m.parameters())

    def state_dict(self, *args, **kwargs):
        # the raw tensors, for the training state: LyCORIS' own state_dict is its export form
        # (w1_a × scalar), which would not resume bit for bit
        out = OrderedDict()
        for i, m in enumerate(self.loras):
            for n, t in (*m.named_parameters(), *m.named_buffers()):
                out[f"loras.{i}.{n}"] = t.detach()
        return out

    def load_state_dict(self, state, strict: bool = True):
        with torch.no_grad():
            for k, t in self.state_dict().items():
                t.copy_(state[k])

    def state_dict_kohya(self) -> dict[str, torch.Tensor]:
        return {f"{m.lora_name}.{k}": v for m in self.loras for k, v in m.custom_state_dict().items()}

    def full_weights(self) -> dict:
        # the saved layout at full precision beside the raw tensors: it is LyCORIS' export form
        # (scalars folded in), which needs the modules to compute (network.kohya_tensors)
        full = super().full_weights()
        full["saved"] = {k: v.detach().cpu().clone() for k, v in self.state_dict_kohya().items()}
        return full

    def max_norm_(self, max_norm: float):
        raise NetworkConfigError("train.scale_weight_norms: kohya's max-norm regularisation is LoRA's only")

    def load_weights(self, path, strict: bool = True) -> list[str]:
        """A file in this network's layout (see LoRANetwork.load_weights). The saved values already
        hold ``use_scalar``'s scalar, which restarts at 1."""
        from safetensors.torch import load_file

        loaded = load_file(str(path))
        missing = check_layout(path, self.state_dict_kohya(), loaded, strict)
        with torch.no_grad():
            for m in self.loras:
                own = {**dict(m.named_parameters()), **dict(m.named_buffers())}
                for k in m.custom_state_dict():
                    key = f"{m.lora_name}.{k}"
                    if key not in loaded:
                        continue
                    if own[k].shape != loaded[key].shape:
                        raise ValueError(f"{path}: {key} has shape {tuple(loaded[key].shape)}, "
                                         f"expected {tuple(own[k].shape)}")
                    own[k].copy_(loaded[key].to(own[k].dtype))
                if isinstance(m.scalar, torch.nn.Parameter):
                    m.scalar.fill_(1.0)
        return sorted({k.split(".")[0] for k in missing})


def algo_args(net: dict) -> dict[str, str]:
    """kohya GUIs' ``ss_network_args`` for ``lycoris.kohya``: ``algo`` and the LyCORIS options set."""
    kind = net["type"]
    out = {"algo": {"dora": "locon" if net.get("conv_dim") else "lora"}.get(kind, kind)}
    if kind == "dora":
        out["dora_wd"] = "True"
    for key, (_, types) in OPTIONS.items():
        value = net.get(key, OPTION_DEFAULTS[key])
        if kind in types and value != OPTION_DEFAULTS[key]:
            out[key] = str(value)
    return out


# ---- lorabuild's own reading of a LyCORIS file (no LyCORIS import) ----

def _rebuild_tucker(t, wa, wb):
    # Tucker core (r, r, k…) with the out-mode factor wa (r, out) and in-mode factor wb (r, in)
    return torch.einsum("i j ..., i p, j r -> p r ...", t, wa, wb)


def _pair(t: dict, a: str, b: str, core: str | None = None):
    if core and core in t:
        return _rebuild_tucker(t[core], t[a], t[b])
    return t[a].flatten(1) @ t[b].flatten(1)


def delta_weight(t: dict, shape) -> torch.Tensor:
    """ΔW (before DoRA) of one module from its saved tensors ``t`` (keys without the module name),
    shaped as the layer weight ``shape``."""
    t = {k: v.float() for k, v in t.items()}
    alpha = float(t["alpha"]) if "alpha" in t else None
    if "hada_w1_a" in t:
        rank = t["hada_w1_b"].shape[0]
        w1, w2 = _pair(t, "hada_w1_a", "hada_w1_b", "hada_t1"), _pair(t, "hada_w2_a", "hada_w2_b", "hada_t2")
        diff = (w1 * w2).reshape(shape)
    elif "lokr_w1" in t or "lokr_w1_a" in t:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = _rebuild_tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        # the rank is that of a factored side; with both sides full matrices there is no rank and no alpha
        rank = t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else None
        if rank is None:
            alpha = None
        if len(shape) > 2 and w2.dim() == 2:
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        diff = torch.kron(w1.contiguous(), w2.contiguous()).reshape(shape)
    else:
        rank = t["lora_down.weight"].shape[0]
        down = t["lora_down.weight"]
        if "lora_mid.weight" in t:  # Tucker LoCon: 1×1 down, k×k mid
            down = torch.einsum("i j ..., j r -> i r ...", t["lora_mid.weight"], down.flatten(1))
        diff = (t["lora_up.weight"].flatten(1) @ down.flatten(1)).reshape(shape)
    return diff * (alpha / rank if alpha and rank else 1.0)


def merged_weight(t: dict, weight: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """The layer weight with the module applied at ``multiplier``: W + m·ΔW, or with ``dora_scale``
    (DoRA, weight decomposition on the output dimension) m·(‖·‖-normalised W + ΔW scaled to the
    saved magnitude − W) + W."""
    w = weight.float()
    merged = w + delta_weight(t, w.shape)
    if "dora_scale" not in t:
        return w + multiplier * (merged - w)
    norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    decomposed = merged * (t["dora_scale"].float().reshape(norm.shape) / norm)
    return w + multiplier * (decomposed - w)
