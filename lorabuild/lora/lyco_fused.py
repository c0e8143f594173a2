"""LyCORIS types on the layers FLUX.1's and SD 3.5's files fuse: one LyCORIS module per *file* layer.

kohya trains ``network_module=lycoris.kohya`` on sd-scripts' own FLUX/SD3 models, which are BFL's and
SAI's: q, k, v are one ``qkv`` Linear (a FLUX single block's ``linear1`` is q, k, v and the MLP input),
and lycoris.kohya wraps every Linear of its target blocks (``DoubleStreamBlock``, ``SingleStreamBlock``,
``SingleDiTBlock`` in ``lycoris/kohya.py`` ``LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE``) as itself:
one LoHa/LoKr/… of shape (Σ parts' rows) × in on each fused layer, named after it
(``lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a``). A LoHa or LoKr of the fused weight is not one
per part (the Hadamard/Kronecker product couples the rows), so lorabuild, which trains diffusers' split
modules, builds the module LyCORIS would build on the fused layer and feeds the parts from it.

How: the LyCORIS module (its own class, made by ``lyco.module_maker``) is built on a *shell* Linear of
the fused shape whose weight is the parts' weights stacked by rows (BFL's/SAI's row order, SAI's
swapped adaLN halves included) while LyCORIS initialises from it (DoRA's ``dora_scale``, IA3's and
diag-OFT's shapes), then only when the module's forward reads it. A part's forward is its own output
plus its rows of the fused layer's LyCORIS delta ``F.linear(x, W'−W)``, computed by the module's own
forward (rebuild mode: ``base + op(x, delta_weight)``, with a zero base) once per input: diffusers
gives q, k and v (and FLUX's MLP input) the very same tensor, so the first part computes the delta
for all and the others take their rows; a different input (or one changed in place) computes anew.
The delta is dropped once every part has taken its rows. So forward, gradients and the saved tensors
are those of LyCORIS on BFL's/SAI's fused layer.
"""
from __future__ import annotations

from functools import lru_cache, partial

import torch
from torch import nn

from .network import NetworkConfigError


class Placeholder(nn.Module):
    """What LoRANetwork's ``make`` gives while the file layers are gathered: the module found there
    and its dim and alpha (:func:`regroup` makes the real modules)."""

    def __init__(self, name, org, dim, alpha):
        super().__init__()
        self.lora_name, self.org, self.dim, self.alpha = name, [org], dim, alpha


@lru_cache(maxsize=None)
def fused_class(cls):
    """``cls`` (a LyCORIS module class) as the module of one fused file layer."""
    return type(f"Fused{cls.__name__}", (_FusedParts, cls), {"lyco_class": cls})


class _FusedParts:
    """Mixed into a LyCORIS module class: the module of one fused file layer, fed to its parts."""

    def setup_parts(self, parts: list[nn.Linear], rows: list[list[tuple[int, int]]], swapped: list[bool]):
        self._parts, self._rows, self._swapped = parts, rows, swapped
        self._shell_empty = self.org_module[0].weight
        self.org_forward = lambda x, *a, **k: x.new_zeros(())  # the delta alone: the parts add their own outputs
        self._cache = None
        self._part_forwards: list = []

    def fused_weight(self) -> torch.Tensor:
        """The file layer's weight: the parts' weights by rows in the file's order."""
        ws = []
        for p, sw in zip(self._parts, self._swapped):
            w = p.weight.detach()
            ws.append(torch.cat(w.chunk(2, dim=0)[::-1], dim=0) if sw else w)
        return torch.cat(ws, dim=0) if len(ws) > 1 else ws[0]

    def _delta(self, x):
        shell = self.org_module[0]
        shell._parameters["weight"] = self.fused_weight()
        try:
            return self.lyco_class.forward(self, x)  # the LyCORIS class's own forward
        finally:
            shell._parameters["weight"] = self._shell_empty

    def _part_forward(self, j: int, x, *args, **kwargs):
        out = self._part_forwards[j](x, *args, **kwargs)
        if self.multiplier == 0.0:
            return out
        c = self._cache
        version = None if x.is_inference() else x._version  # (an inference tensor has no version counter)
        if c is None or c[0] is not x or c[1] != version or j in c[3]:
            c = self._cache = [x, version, self._delta(x), set()]
        c[3].add(j)
        delta = c[2]
        if len(c[3]) == len(self._parts):
            self._cache = None
        if delta.dim() == 0:  # LyCORIS' module dropout: the fused layer sat this pass out (its zero base)
            return out
        pieces = [delta[..., a:b] for a, b in self._rows[j]]
        return out + (torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]).to(out.dtype)

    def apply_to(self, **kwargs):
        # a forward a part already had of its own (diffusers' layerwise-casting hook) is kept under ours
        self._own_forwards = [p.__dict__.get("forward") for p in self._parts]
        self._part_forwards = [p.forward for p in self._parts]
        for j, p in enumerate(self._parts):
            p.forward = partial(self._part_forward, j)

    def restore(self):
        for p, own in zip(self._parts, self._own_forwards):
            if own is not None:
                p.forward = own
            elif "forward" in p.__dict__:
                del p.forward
        self._cache = None


def build(name: str, found: list, make):
    """The LyCORIS module of file layer ``name`` over its parts ``found`` ([(part index, placeholder,
    halves swapped)], every part present); ``make``: lyco.module_maker's."""
    found = sorted(found, key=lambda f: f[0])
    first = found[0][1]
    for _, ph, _ in found[1:]:
        if (ph.dim, float(ph.alpha)) != (first.dim, float(first.alpha)):
            raise NetworkConfigError(f"network: {name}'s parts differ in dim or alpha, so they cannot be one "
                                     "LyCORIS module on the fused layer")
    parts, swapped = [ph.org[0] for _, ph, _ in found], [sw for _, _, sw in found]
    if len(parts) == 1 and not swapped[0]:
        return make(name, parts[0], first.dim, first.alpha)  # the file's layer is diffusers' module itself
    rows, start = [], 0
    for p, sw in zip(parts, swapped):
        n = p.out_features
        rows.append([(start + n // 2, start + n), (start, start + n // 2)] if sw else [(start, start + n)])
        start += n
    shell = nn.Linear(parts[0].in_features, start, bias=False, device="meta")
    holder = _FusedParts.__new__(_FusedParts)
    holder._parts, holder._swapped = parts, swapped
    shell._parameters["weight"] = holder.fused_weight().float()  # what LyCORIS initialises from
    module = make(name, shell, first.dim, first.alpha, wrap=fused_class)
    shell._parameters["weight"] = torch.empty(start, parts[0].in_features, device="meta")
    module.setup_parts(parts, rows, swapped)
    return module


def regroup(network, table: dict, make) -> None:
    """Replace ``network``'s placeholders by LyCORIS modules: on the file's layers for the denoiser's
    (``table``: family.file_modules; in the order of their first part), on the module itself for the rest
    (text encoders). A file layer only some of whose parts train is an error."""
    layers: dict[str, list | nn.Module] = {}
    for m in network.loras[: network.n_unet]:
        entry = table.get(m.lora_name)
        if entry is None:
            layers[m.lora_name] = make(m.lora_name, m.org[0], m.dim, m.alpha)
            continue
        fname, j, n, sw = entry
        layers.setdefault(fname, []).append((j, m, sw))
    mods = []
    for fname, found in layers.items():
        if isinstance(found, nn.Module):
            mods.append(found)
            continue
        n = table[found[0][1].lora_name][2]
        if len(found) != n:
            names = sorted(k for k, v in table.items() if v[0] == fname)
            raise NetworkConfigError(
                f"network.exclude_patterns: {fname} is one layer in the file ({n} parts: {', '.join(names)}); a LyCORIS "
                f"type trains it whole, so its parts train together or not at all (only {len(found)} of {n} are left)")
        mods.append(build(fname, found, make))
    rest = [make(m.lora_name, m.org[0], m.dim, m.alpha) for m in network.loras[network.n_unet:]]
    network.loras = nn.ModuleList([*mods, *rest])
    network.n_unet = len(mods)
