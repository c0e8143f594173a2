"""LyCORIS network types (``network.type: loha | lokr | dora | ia3 | full | diag-oft``) on the
``lycoris-lora`` package.

The modules are LyCORIS' own (``lycoris.modules``); lorabuild picks the targets and names them
as for its LoRA (``network._candidates``: kohya names, SGM names for SDXL), so the file has
the layout kohya's ``lycoris.kohya`` writes and A1111, ComfyUI and Forge load:
``<lora_unet_…>.hada_w1_a/_w1_b/_w2_a/_w2_b`` (+ ``hada_t1/t2`` with Tucker) for LoHa,
``.lokr_w1`` or ``.lokr_w1_a/_b`` and ``.lokr_w2`` or ``.lokr_w2_a/_b`` (+ ``lokr_t2``) for
LoKr, ``.lora_down/.lora_up.weight`` + ``.dora_scale`` for DoRA, and ``.alpha`` for all;
``.weight`` + ``.on_input`` for IA3, ``.diff`` + ``.diff_b`` for full, ``.oft_blocks`` (+
``.rescale``) + ``.alpha`` (the constraint) for diag-OFT; with ``train_norm`` the target blocks'
LayerNorm/GroupNorm layers too, as ``.w_norm`` + ``.b_norm``.

``merged_weight`` is lorabuild's own reading of such a file (the arithmetic ComfyUI's
``weight_adapter`` and A1111's ``lyco`` code apply, from their sources): a merged layer weight
from the saved tensors alone, with no LyCORIS import. The tests hold it against the library.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .network import UNET_CONV_TARGETS, LoRANetwork, NetworkConfigError, target_classes, te_path_prefix, check_layout

from .lyco_fused import Placeholder, regroup
from .lyco_options import OPTION_DEFAULTS, OPTIONS, option_problems
from ..families import family


def _full_module():
    from lycoris.modules import FullModule

    class Full(FullModule):
        """LyCORIS' full fine-tuning module, trained in float32 whatever the base's dtype, and
        reversible: restore gives the layer back its own parameters (LyCORIS' puts a CPU copy)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.weight = nn.Parameter(self.weight.detach().float())
            if self.bias is not None:
                self.bias = nn.Parameter(self.bias.detach().float())

        def apply_to(self, **kwargs):
            org = self.org_module[0]
            self._org_params = (org.weight, org.bias)
            super().apply_to(**kwargs)

        def restore(self):
            org = self.org_module[0]
            org.forward = self.org_forward
            with torch.no_grad():  # back to holding the difference, as before apply_to
                self.weight.sub_(self._org_params[0].to(self.weight))
                if self.bias is not None:
                    self.bias.sub_(self._org_params[1].to(self.bias))
            org.weight, org.bias = self._org_params
            self.is_diff = True

        def custom_state_dict(self):
            # the difference whether applied (weight is W + it) or not (weight is it; LyCORIS' own
            # subtracts W there too)
            if not self.is_diff:
                return super().custom_state_dict()
            return {"diff": self.weight.data.cpu(), **({"diff_b": self.bias.data.cpu()} if self.bias is not None else {})}

        def load_saved(self, saved: dict) -> None:
            """The file's ``diff``/``diff_b``, applied or not."""
            with torch.no_grad():
                for own, key, org in ((self.weight, "diff", self.org_weight),
                                      (self.bias, "diff_b", self.org_bias and self.org_bias[0])):
                    if own is not None and key in saved:
                        own.copy_(saved[key].to(own) + (0 if self.is_diff else org.to(own)))
    return Full


def module_maker(net: dict):
    """``make(name, module, dim, alpha)`` for LoRANetwork: the LyCORIS module of ``net['type']``
    (a LayerNorm/GroupNorm gets LyCORIS' norm module: ``train_norm``)."""
    from lycoris.modules import DiagOFTModule, IA3Module, LoConModule, LohaModule, LokrModule
    from lycoris.modules.norms import NormModule

    kind = net["type"]
    cls = {"loha": LohaModule, "lokr": LokrModule, "dora": LoConModule, "ia3": IA3Module,
           "diag-oft": DiagOFTModule}.get(kind) or _full_module()
    kw = {arg: net.get(key, OPTION_DEFAULTS[key]) for key, (arg, types) in OPTIONS.items() if arg and kind in types}
    if kind == "dora":
        kw["weight_decompose"] = True
    problems = option_problems(net)
    if problems:
        raise NetworkConfigError("{}.{}: {}".format(*problems[0]))
    rank_dropout, module_dropout = net.get("rank_dropout") or 0.0, net.get("module_dropout") or 0.0

    def make(name, module, dim, alpha, wrap=None):
        """``wrap``: a class maker for the module's class (lyco_fused.fused_class: a fused file layer's)."""
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):  # as lycoris.kohya makes them
            return NormModule(name, module, 1.0, rank_dropout, module_dropout)
        # bypass_mode False: the weight-rebuild forward (W + ΔW), the one every type and DoRA share
        return (wrap(cls) if wrap else cls)(name, module, 1.0, dim, alpha, 0.0, rank_dropout, module_dropout,
                                            bypass_mode=False, **kw)
    return make


def _norm_targets(root: nn.Module, prefix: str, classes, path_prefix: str = "", rename=None):
    """(kohya name, layer) for every affine LayerNorm/GroupNorm inside the named container blocks:
    lycoris.kohya's ``train_norm`` modules, named as network._targets names the Linear layers."""
    for name, block in root.named_modules():
        if block.__class__.__name__ not in classes:
            continue
        for child_name, child in block.named_modules():
            affine = getattr(child, "weight", None) is not None and getattr(child, "bias", None) is not None
            if isinstance(child, (nn.LayerNorm, nn.GroupNorm)) and affine:
                path = f"{path_prefix}{name}.{child_name}"
                yield f"{prefix}_{rename(path) if rename else path}".replace(".", "_"), child


class LycoNetwork(LoRANetwork):
    """LoRANetwork's targets, names, parts and rates, with LyCORIS modules in them; with
    ``train_norm`` each part also trains the norm layers of its target blocks (after its others)."""

    def __init__(self, unet, text_encoders: list, *, train_norm: bool = False, **kw):
        # FLUX.1, SD 3.5: the modules are the files' (fused) layers, as lycoris.kohya trains them
        table = family(kw.get("arch", "sd1")).file_modules(dict(getattr(unet, "config", {}) or {}))
        super().__init__(unet, text_encoders, **{**kw, "make": Placeholder} if table else kw)
        if table:
            regroup(self, table, kw["make"])
        if train_norm:
            self._add_norms(unet, text_encoders, kw)

    def _add_norms(self, unet, text_encoders: list, kw: dict) -> None:
        import re

        from .blocks import block_index
        from .network import TE_ALIASES, TE_TARGETS, UNET_TARGETS

        arch, make, blocks = kw.get("arch", "sd1"), kw["make"], kw.get("blocks")
        rename = None
        if arch == "sdxl":
            from .layout import to_original, unet_block_map

            block_map = unet_block_map(dict(unet.config))
            rename = lambda path: to_original(path, block_map)  # noqa: E731
        ex = [re.compile(p) for p in kw.get("exclude_patterns") or ()]
        inc = [re.compile(p) for p in kw.get("include_patterns") or ()]
        keep = lambda n: not (any(p.fullmatch(n) for p in ex) and not any(p.fullmatch(n) for p in inc))  # noqa: E731
        conv = bool(kw.get("conv_dim")) or bool(blocks and blocks["conv_dims"])
        parts: list[list] = [[] for _ in range(1 + len(self.te_counts))]
        if kw.get("train_unet", True):
            classes = target_classes([unet], kw.get("unet_targets") or UNET_TARGETS, "unet_target_modules")
            classes += tuple(c for c in UNET_CONV_TARGETS if conv and c not in classes)
            # kohya: no module in a block whose dim is 0
            parts[0] = [(n, m) for n, m in _norm_targets(unet, "lora_unet", classes, rename=rename)
                        if not (blocks and not blocks["dims"][block_index(n, arch)])]
        if self.te_counts:
            classes = target_classes(text_encoders, kw.get("te_targets") or TE_TARGETS, "text_encoder_target_modules",
                               TE_ALIASES)
            prefixes = ["lora_te1", "lora_te2"] if len(text_encoders) == 2 else ["lora_te"]
            for i, (te, prefix) in enumerate(zip(text_encoders, prefixes), 1):
                parts[i] = list(_norm_targets(te, prefix, classes, te_path_prefix(te)))
        counts, mods, start = [self.n_unet, *self.te_counts], [], 0
        for i, found in enumerate(parts):
            seen: set = set()
            norms = [make(n, m, 0, 0) for n, m in found if keep(n) and not (n in seen or seen.add(n))]
            mods += [*self.loras[start:start + counts[i]], *norms]
            start += counts[i]
            counts[i] += len(norms)
        self.loras = nn.ModuleList(mods)
        self.n_unet, self.te_counts = counts[0], counts[1:]

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
        # a LyCORIS module's state_dict is its saved layout (its custom one, where it has one)
        return {f"{m.lora_name}.{k}": v for m in self.loras for k, v in m.state_dict().items()}

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
                saved = m.state_dict()
                for k, v in saved.items():
                    key = f"{m.lora_name}.{k}"
                    if key in loaded and v.shape != loaded[key].shape:
                        raise ValueError(f"{path}: {key} has shape {tuple(loaded[key].shape)}, "
                                         f"expected {tuple(v.shape)}")
                mine = {k: loaded[f"{m.lora_name}.{k}"] for k in saved if f"{m.lora_name}.{k}" in loaded}
                if hasattr(m, "load_saved"):  # full: the file holds the difference, the module may hold W + it
                    m.load_saved(mine)
                    continue
                own = {**dict(m.named_parameters()), **dict(m.named_buffers())}
                for k, v in mine.items():
                    own[k].copy_(v.to(own[k].dtype))
                if isinstance(getattr(m, "scalar", None), torch.nn.Parameter):
                    m.scalar.fill_(1.0)
        return sorted({k.split(".")[0] for k in missing})


# ---- lorabuild's own reading of a LyCORIS file (no LyCORIS import) ----

def _rebuild_tucker(t, wa, wb):
    # Tucker core (r, r, k…) with the out-mode factor wa (r, out) and in-mode factor wb (r, in)
    return torch.einsum("i j ..., i p, j r -> p r ...", t, wa, wb)


def _pair(t: dict, a: str, b: str, core: str | None = None):
    if core and core in t:
        return _rebuild_tucker(t[core], t[a], t[b])
    return t[a].flatten(1) @ t[b].flatten(1)


def _oft_rotation(t: dict, out_dim: int) -> torch.Tensor:
    """diag-OFT's block rotations R = (I + Q)(I − Q)⁻¹, Q the skew part of ``oft_blocks``, its norm
    capped at the constraint (LyCORIS: the saved alpha × the output width; 0: none)."""
    blocks = t["oft_blocks"]
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype)
    q = blocks - blocks.transpose(1, 2)
    cap = float(t.get("alpha", torch.tensor(0.0))) * out_dim
    norm = q.norm() + 1e-8
    if cap > 0 and norm > cap:
        q = q * cap / norm
    return (eye + q) @ torch.linalg.inv(eye - q)


def delta_weight(t: dict, shape, weight: torch.Tensor | None = None) -> torch.Tensor:
    """ΔW (before DoRA) of one module from its saved tensors ``t`` (keys without the module name),
    shaped as the layer weight ``shape``; IA3 and diag-OFT act on the layer ``weight`` itself."""
    t = {k: v.float() for k, v in t.items()}
    if "diff" in t:
        return t["diff"].reshape(shape)
    if "w_norm" in t:
        return t["w_norm"].reshape(shape)
    ones = [1] * (len(shape) - 1)
    if "on_input" in t:  # IA3: W scaled per input (on_input) or output channel by (1 + w)
        scale = t["weight"].flatten()
        return weight.float() * (scale.view(1, -1, *ones[1:]) if int(t["on_input"]) else scale.view(-1, *ones))
    if "oft_blocks" in t:
        r = _oft_rotation(t, shape[0])
        w = weight.float()
        rotated = torch.einsum("k n m, k n ... -> k m ...", r, w.reshape(r.shape[0], r.shape[1], *shape[1:]))
        rotated = rotated.reshape(shape) * (t["rescale"].reshape(-1, *ones) if "rescale" in t else 1.0)
        return rotated - w
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
    merged = w + delta_weight(t, w.shape, w)
    if "dora_scale" not in t:
        return w + multiplier * (merged - w)
    norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    decomposed = merged * (t["dora_scale"].float().reshape(norm.shape) / norm)
    return w + multiplier * (decomposed - w)


def merged_bias(t: dict, bias: torch.Tensor | None, multiplier: float = 1.0) -> torch.Tensor | None:
    """The layer bias with the module applied: full's ``diff_b`` and a norm module's ``b_norm`` add
    to it; the other types leave it."""
    key = "diff_b" if "diff_b" in t else "b_norm" if "b_norm" in t else None
    if key is None or bias is None:
        return bias
    return bias.float() + multiplier * t[key].float().reshape(bias.shape)
