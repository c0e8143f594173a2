"""A kohya-compatible LoRA ("LoRA-LierLa") for diffusers/transformers SD models.

Facts from sd-scripts ``networks/lora.py`` (commit 48d368f): targets are every Linear
and 1×1 Conv2d inside the UNet's Transformer2D blocks and inside the text encoder's
attention and MLP blocks; names are ``lora_unet_`` / ``lora_te_`` + the module path with
``.`` → ``_``; tensors ``<name>.lora_down.weight``, ``<name>.lora_up.weight`` and a 0-dim
``<name>.alpha``; scale = alpha / dim; ``lora_down`` kaiming-uniform(a=√5), ``lora_up``
zeros. For SD 1.x/2.x diffusers' module paths *are* kohya's names (its UNet mirrors
diffusers); for SDXL kohya's UNet names follow the original SGM layout
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, see ``lora/layout.py``) and the
two text encoders are ``lora_te1_`` / ``lora_te2_``. So AUTOMATIC1111, ComfyUI and
diffusers read the file unchanged.
"""
from __future__ import annotations

import math
import re
import weakref
from pathlib import Path

import torch
from torch import nn

from ..precision import autocast_on
from .blocks import block_index
from .lyco_options import SPLIT_QKV_MAX_NORM
from ..families import family

UNET_TARGETS = ("Transformer2DModel",)  # kohya UNET_TARGET_REPLACE_MODULE
# LoCon (kohya: conv_dim): the ResNet blocks and resamplers too; their 3×3 convs get
# ``conv_dim``/``conv_alpha``, their Linear and 1×1 convs the ordinary dim/alpha.
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_TARGETS = ("CLIPAttention", "CLIPMLP")  # kohya TEXT_ENCODER_TARGET_REPLACE_MODULE
# transformers names its attention class after the attention implementation in use
TE_ALIASES = {"CLIPAttention": ("CLIPSdpaAttention", "CLIPFlashAttention2")}


class NetworkConfigError(ValueError):
    """The network options cannot build a network on this model; the message names the field."""


class LoRAModule(nn.Module):
    """``y = W x + up(down(x)) · multiplier · alpha/dim`` around an existing Linear or 1×1 conv."""

    def __init__(self, name: str, org: nn.Module, dim: int, alpha: float, dropout: float = 0.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0):
        super().__init__()
        self.lora_name = name
        if isinstance(org, nn.Conv2d):  # a 3×3 conv (LoCon) keeps its kernel, stride and padding in lora_down
            self.lora_down = nn.Conv2d(org.in_channels, dim, org.kernel_size, org.stride, org.padding, bias=False)
            self.lora_up = nn.Conv2d(dim, org.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(org.in_features, dim, bias=False)
            self.lora_up = nn.Linear(dim, org.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = float(alpha) / dim
        self.multiplier = 1.0
        self.dropout = dropout  # kohya network_dropout: on lora_down's output, while training
        self.rank_dropout = rank_dropout  # kohya network_args rank_dropout / module_dropout, while training
        self.module_dropout = module_dropout
        self._org = [org]  # a list, so the frozen base module is not registered (or moved) with ours
        self.fused = None  # split_qkv false: the FusedDraw its fused layer's parts share (share_down)

    def apply_to(self) -> None:
        org = self._org[0]
        self._org_forward = org.forward
        # a forward the module already had of its own (diffusers' layerwise-casting hook: base_precision)
        self._own_forward = org.__dict__.get("forward")
        org.forward = self.forward  # instance attribute: nn.Module.__call__ now reaches us

    def restore(self) -> None:
        org = self._org[0]
        if getattr(self, "_own_forward", None) is not None:
            org.forward = self._own_forward
        elif "forward" in org.__dict__:
            del org.forward

    def forward(self, x):
        out = self._org_forward(x)
        if self.multiplier == 0.0:
            return out
        if self.fused is not None and self.training and self.drops:  # one draw for the fused layer's parts
            lx, scale = self.fused.draw(self, x)
            if lx is None:
                return out
        else:
            # kohya's module dropout: the whole module sits out this forward pass. Drawn from the CPU's
            # global generator (seeded, in the training state, replayed by gradient checkpointing): no
            # device round trip.
            if self.module_dropout and self.training and float(torch.rand(1)) < self.module_dropout:
                return out
            lx, scale = self.down(x)
        lx = self.lora_up(lx)
        # added into the base output in place, scaled on the way: no product and no sum tensor of
        # the layer's full output size (the base layer's backward does not read its output)
        return out.add_(lx.to(out.dtype), alpha=self.multiplier * scale)

    @property
    def drops(self) -> bool:
        return bool(self.dropout or self.rank_dropout or self.module_dropout)

    def down(self, x):
        """(lora_down's output with the dropouts drawn while training, the scale that goes with it)."""
        # LoRA weights stay fp32 while the base may run in fp16/bf16. Under autocast the matmul casts
        # its operands itself: an fp32 copy of the activation would only be cast back (same values).
        if not autocast_on(x.device.type):
            x = x.to(self.lora_down.weight.dtype)
        lx = self.lora_down(x)
        if self.dropout and self.training:
            lx = nn.functional.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.rank_dropout and self.training:
            lx, scale = rank_dropout(lx, self.rank_dropout), scale / (1.0 - self.rank_dropout)
        return lx, scale

    def updown_norm(self):
        """Frobenius norm of the module's weight update ``up · down · alpha/dim`` (a 0-dim tensor on the
        weights' device), from the r×r Gram matrices: ‖UD‖² = Σ (UᵀU) ∘ (DDᵀ), so the out×in product
        (kohya forms it) is never made. A 3×3 LoCon down flattens to (r, in·9), which is kohya's conv
        composition."""
        up = self.lora_up.weight.float().flatten(1)
        down = self.lora_down.weight.float().flatten(1)
        return ((up.T @ up) * (down @ down.T)).sum().clamp(min=0).sqrt() * self.scale


class FusedDraw:
    """One fused layer's dropouts, drawn once per forward for all its parts (``network.split_qkv: false``).

    kohya's ``networks/lora_flux.py`` ``LoRAModule.forward`` (split_dims None, the fused Linear of its
    default split_qkv=False; ``lora_sd3.py`` uses the same module) draws ``module_dropout`` once
    (``torch.rand(1)``), ``dropout`` on lora_down's output and ``rank_dropout`` as one (batch, rank) mask,
    then applies lora_up. lorabuild's parts (diffusers' split to_q/to_k/to_v, a single block's proj_mlp)
    share one lora_down and are called one after another on the same input tensor (diffusers
    ``transformer_flux._get_projections``, ``FluxSingleTransformerBlock.forward``, ``JointAttnProcessor2_0``),
    so the first part to see an input draws and keeps lora_down's output (or the skip); the other
    ``parts − 1`` calls on that same input reuse it, and together they are kohya's one LoRA with one set
    of masks. The input is held by a weak reference, so a later forward's input never matches a freed
    one, and the draw is used ``parts`` times at most, so a second forward on the very same tensor draws
    again. Gradient checkpointing's recompute restores the generators and calls the parts in the same
    order, so it draws the same masks again."""

    def __init__(self, parts: int):
        self.parts = parts
        self._x, self._out, self._left = None, None, 0

    def draw(self, module: "LoRAModule", x):
        """(lora_down's output with the fused layer's masks, its scale), or (None, 0) when it sits out."""
        if self._left and self._x() is x:
            self._left -= 1
            return self._out
        if module.module_dropout and float(torch.rand(1)) < module.module_dropout:
            out = (None, 0.0)
        else:
            out = module.down(x)
        self._x, self._out, self._left = weakref.ref(x), out, self.parts - 1
        return out

    def __getstate__(self):  # a copied or pickled network keeps no activation
        return {"parts": self.parts}

    def __setstate__(self, state):
        self.__init__(state["parts"])


def rank_dropout(lx, p: float):
    """kohya's rank dropout: each sample's rank channels zeroed with probability ``p`` (one mask per
    sample, shared over its tokens or pixels); the caller scales by 1/(1−p). ``lx`` is lora_down's
    output: (B, r), (B, tokens, r) or (B, r, H, W). Drawn on lx's device from its global generator."""
    conv = lx.ndim == 4
    keep = torch.rand((lx.shape[0], lx.shape[1] if conv else lx.shape[-1]), device=lx.device) > p
    if conv:
        keep = keep[:, :, None, None]
    elif lx.ndim == 3:
        keep = keep[:, None, :]
    return lx * keep.to(lx.dtype)


def _targets(root: nn.Module, prefix: str, container_classes, path_prefix: str = "",
             conv: bool = False, rename=None):
    """(kohya name, module, is 3×3) for every Linear / 1×1 Conv2d (and 3×3 Conv2d with ``conv``)
    inside the named container blocks; ``rename`` maps a module path to the layout kohya names."""
    for name, block in root.named_modules():
        if block.__class__.__name__ not in container_classes:
            continue
        for child_name, child in block.named_modules():
            is_conv = isinstance(child, nn.Conv2d)
            is_1x1 = is_conv and child.kernel_size == (1, 1)
            if isinstance(child, nn.Linear) or is_1x1 or (conv and is_conv):
                path = f"{path_prefix}{name}.{child_name}"
                path = rename(path) if rename else path
                yield f"{prefix}_{path}".replace(".", "_"), child, is_conv and not is_1x1


def te_path_prefix(te: nn.Module) -> str:
    # kohya names follow transformers 4's CLIPTextModel, whose layers sit under
    # `text_model.`; transformers 5 dropped that level. The names must not change with it.
    # (T5's names are its own paths: kohya's lora_te3_encoder_block_0_…)
    return "" if hasattr(te, "text_model") or not type(te).__name__.startswith("CLIP") else "text_model."


def target_classes(roots: list, wanted, field: str, aliases: dict | None = None) -> tuple[str, ...]:
    """The wanted container class names (with their aliases); a name no module has is an error."""
    present = {m.__class__.__name__ for r in roots for m in r.modules()}
    out = []
    for c in wanted:
        names = (c, *(aliases or {}).get(c, ()))
        if not present.intersection(names):
            raise NetworkConfigError(f"network.{field}: no module of class {c!r} in this model")
        out += names
    return tuple(out)


def _compile(patterns, field: str) -> list:
    try:
        return [re.compile(p) for p in patterns]
    except re.error as exc:
        raise NetworkConfigError(f"network.{field}: {exc.pattern!r} is not a regular expression ({exc})") from None


def _filter(found: list, exclude, include) -> list:
    """kohya's rule: a module is dropped when its name matches (whole) an exclude pattern and
    no include pattern. A pattern that matches no module is a mistake worth an error."""
    ex, inc = _compile(exclude, "exclude_patterns"), _compile(include, "include_patterns")
    names = [n for n, *_ in found]
    for field, pats in (("exclude_patterns", ex), ("include_patterns", inc)):
        for p in pats:
            if not any(p.fullmatch(n) for n in names):
                raise NetworkConfigError(
                    f"network.{field}: {p.pattern!r} matches none of the {len(names)} modules (a pattern matches the "
                    f"whole kohya name, e.g. {names[0] if names else 'lora_unet_…'})")
    return [f for f in found if not (any(p.fullmatch(f[0]) for p in ex) and not any(p.fullmatch(f[0]) for p in inc))]


def _candidates(unet, text_encoders: list, arch: str, train_unet: bool, conv: bool, unet_targets, te_targets) -> list:
    """(kohya name, module, is 3×3, part: 0 UNet, 1/2 text encoders) for every module the targets
    hold, UNet first; LoCon (``conv``) adds kohya's ResNet and resampler classes."""
    fam = family(arch)
    rename = fam.unet_rename(unet)  # SDXL: kohya names follow the original SGM layout
    found: list[tuple[str, nn.Module, bool, int]] = []
    if train_unet:
        classes = target_classes([unet], unet_targets, "unet_target_modules")
        found += [(*t, 0) for t in _targets(unet, "lora_unet", classes, conv=conv, rename=rename)]
        if conv:
            extra = tuple(c for c in UNET_CONV_TARGETS if c not in classes)
            found += [(*t, 0) for t in _targets(unet, "lora_unet", extra, conv=True, rename=rename)]
    if text_encoders:
        classes = target_classes(text_encoders, te_targets, "text_encoder_target_modules", TE_ALIASES)
        prefixes = fam.te_prefixes(len(text_encoders))
        for part, (te, prefix) in enumerate(zip(text_encoders, prefixes), 1):
            found += [(*t, part) for t in _targets(te, prefix, classes, te_path_prefix(te))]
    seen: set[str] = set()
    return [f for f in found if not (f[0] in seen or seen.add(f[0]))]  # nested target classes: once


class LoRANetwork(nn.Module):
    def __init__(self, unet, text_encoders: list, dim: int, alpha: float, train_unet: bool = True,
                 train_text_encoder: bool = True, arch: str = "sd1", conv_dim: int | None = None,
                 conv_alpha: float | None = None, dropout: float = 0.0, unet_targets=UNET_TARGETS,
                 te_targets=TE_TARGETS, exclude_patterns=(), include_patterns=(), blocks: dict | None = None,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, make=None, keep=None, embedders=()):
        """``blocks``: per-block settings from ``blocks.block_settings`` (kohya block_dims & co.);
        ``make(name, module, dim, alpha)``: the module to train there (default: kohya's LoRA);
        ``keep(name)``: whether a denoiser module trains (a flow model's block selection, flow_select);
        ``embedders``: (name, module, dim) more denoiser modules at their own dim and ``alpha``, after the
        blocks' (kohya's in_dims / emb_dims, flow_select.embedders)."""
        super().__init__()
        family(arch)  # an unknown architecture: ValueError before any module is looked at
        if tuple(unet_targets) == UNET_TARGETS:  # the default (SD's Transformer2DModel): the family's own targets
            unet_targets = family(arch).unet_targets
        conv = bool(conv_dim) or bool(blocks and blocks["conv_dims"])
        found = _candidates(unet, text_encoders if train_text_encoder else [], arch, train_unet, conv,
                            unet_targets, te_targets)
        if not found:
            raise NetworkConfigError("network: the target modules hold no Linear or 1×1 conv to train "
                                     "(unet_target_modules, text_encoder_target_modules)")
        found = _filter(found, exclude_patterns, include_patterns)
        if not found:
            raise NetworkConfigError("network.exclude_patterns: every module is excluded (include_patterns "
                                     "brings modules back)")
        found = [f for f in found if keep is None or f[3] or keep(f[0])]
        if not found:
            raise NetworkConfigError("network: the block selection (train_*block_indices, train_blocks) leaves no "
                                     "module to train")
        conv_alpha = conv_dim if conv_alpha is None else conv_alpha
        if make is None:
            make = lambda n, m, d, a: LoRAModule(n, m, d, a, dropout, rank_dropout, module_dropout)  # noqa: E731
        made = []
        for name, module, is3, part in found:
            d, a = (conv_dim, conv_alpha) if is3 else (dim, alpha)
            if blocks and part == 0:
                i = block_index(name, arch)
                d, a = (blocks["conv_dims"][i], blocks["conv_alphas"][i]) if is3 else (blocks["dims"][i], blocks["alphas"][i])
            if d:  # kohya: a block dim of 0 (or an lr weight of 0) creates no module there
                made.append((part, make(name, module, d, a)))
        made += [(0, make(name, module, d, alpha)) for name, module, d in embedders]
        made.sort(key=lambda pm: pm[0])  # stable: the denoiser's modules first, then each text encoder's
        if not made:
            raise NetworkConfigError("network.block_dims: every remaining module sits in a block whose dim or lr "
                                     "weight is 0")
        self.loras = nn.ModuleList(m for _, m in made)
        self.n_unet = sum(1 for p, _ in made if p == 0)
        self.te_counts = [sum(1 for p, _ in made if p == k) for k in range(1, len(text_encoders) + 1)] \
            if train_text_encoder and text_encoders else []
        self.arch = arch
        self.denoiser_config = dict(getattr(unet, "config", {}) or {})  # the saved layout's widths (FLUX's fused qkv)
        self.block_lr_weight = blocks["lr_weights"] if blocks else None

    def apply(self) -> None:
        for m in self.loras:
            m.apply_to()

    def restore(self) -> None:
        for m in self.loras:
            m.restore()

    def set_multiplier(self, value: float) -> None:
        for m in self.loras:
            m.multiplier = float(value)

    def share_down(self, groups: dict[str, str]) -> int:
        """kohya's ``split_qkv`` false: the modules that are parts of one fused layer (``groups``: {module
        name: fused layer}) use the first one's lora_down, so together they are one LoRA on that layer
        (one down of rank r; the ups are the fused up's row blocks), and draw their dropouts once per
        forward (:class:`FusedDraw`). Returns the fused layers shared."""
        by_layer: dict[str, list] = {}
        for m in self.loras:
            if m.lora_name in groups:
                by_layer.setdefault(groups[m.lora_name], []).append(m)
        for layer, mods in by_layer.items():
            first = mods[0]
            for m in mods[1:]:
                if m.lora_down.weight.shape != first.lora_down.weight.shape or float(m.alpha) != float(first.alpha):
                    raise NetworkConfigError(f"network.split_qkv: {layer}'s parts differ in dim or alpha (block_dims), "
                                             "so they cannot be one LoRA")
                m.lora_down = first.lora_down
            draw = FusedDraw(len(mods))
            for m in mods:
                m.fused = draw
        self.shared_layers = len(by_layer)
        return self.shared_layers

    def module_count(self) -> tuple[int, int]:
        return self.n_unet, len(self.loras) - self.n_unet

    @torch.no_grad()
    def max_norm_(self, max_norm: float):
        """kohya's ``apply_max_norm_regularization`` (``scale_weight_norms``): every module whose update
        norm (``updown_norm``) is above ``max_norm`` gets up and down scaled by √(max/norm), so the update
        is ``max_norm``; the others are multiplied by exactly 1. Returns (modules scaled, mean norm, largest
        norm) after scaling, as 0-dim tensors on the weights' device: nothing waits for the device here."""
        if getattr(self, "shared_layers", 0):
            raise NetworkConfigError(f"train.scale_weight_norms: {SPLIT_QKV_MAX_NORM}")
        norms = torch.stack([m.updown_norm() for m in self.loras])
        floored = norms.clamp(min=max_norm / 2)  # kohya's floor: a zero norm divides nothing
        ratio = floored.clamp(max=max_norm) / floored
        root = ratio.sqrt()
        for m, r in zip(self.loras, root):
            m.lora_up.weight.mul_(r.to(m.lora_up.weight.dtype))
            m.lora_down.weight.mul_(r.to(m.lora_down.weight.dtype))
        after = norms * ratio
        return (ratio < 1).sum(), after.mean(), after.max()

    def param_groups(self, unet_lr: float, te_lr: float, loraplus_ratio: float | None = None,
                     te2_lr: float | None = None, loraplus_te_ratio: float | None = None) -> list[dict]:
        """One group per (model part, down/up); LoRA+ (kohya loraplus_lr_ratio) multiplies lora_up's rate,
        ``loraplus_ratio`` the UNet's and ``loraplus_te_ratio`` (default: the same) the text encoders'.
        SDXL's second text encoder has its own rate (``te2_lr``, default ``te_lr``). With block lr
        weights (kohya down/mid/up_lr_weight) each UNet block is its own part at ``unet_lr × weight``,
        and its groups carry ``lr_weight`` so the log can show the base rate."""
        n1 = self.te_counts[0] if self.te_counts else 0
        unet = list(self.loras[: self.n_unet])
        te_ratio = loraplus_ratio if loraplus_te_ratio is None else loraplus_te_ratio
        parts = [(unet, unet_lr, None, loraplus_ratio)]
        if self.block_lr_weight is not None:
            by_block: dict[int, list] = {}
            for m in unet:  # in module order, as kohya's prepare_optimizer_params
                by_block.setdefault(block_index(m.lora_name, self.arch), []).append(m)
            parts = [(mods, unet_lr * self.block_lr_weight[i], self.block_lr_weight[i], loraplus_ratio)
                     for i, mods in by_block.items()]
        parts += [(self.loras[self.n_unet : self.n_unet + n1], te_lr, None, te_ratio),
                  (self.loras[self.n_unet + n1 :], te_lr if te2_lr is None else te2_lr, None, te_ratio)]
        groups = []
        for mods, lr, weight, ratio in parts:
            if not len(mods):
                continue
            extra = {} if weight is None else {"lr_weight": weight}
            if ratio:
                groups += [{"params": [m.lora_down.weight for m in mods], "lr": lr, **extra},
                           {"params": [m.lora_up.weight for m in mods], "lr": lr * ratio, **extra}]
            else:
                groups.append({"params": [p for m in mods for p in self.module_params(m)], "lr": lr, **extra})
        seen: set[int] = set()  # a down shared by a fused layer's parts (split_qkv false) is trained once
        for g in groups:
            g["params"] = [p for p in g["params"] if not (id(p) in seen or seen.add(id(p)))]
        return [g for g in groups if g["params"]]

    def module_params(self, m) -> list:
        """What the optimizer trains in one module, in a fixed order (the optimizer state follows it)."""
        return [m.lora_down.weight, m.lora_up.weight]

    def state_dict_kohya(self) -> dict[str, torch.Tensor]:
        sd = {}
        for m in self.loras:
            sd[f"{m.lora_name}.lora_down.weight"] = m.lora_down.weight
            sd[f"{m.lora_name}.lora_up.weight"] = m.lora_up.weight
            sd[f"{m.lora_name}.alpha"] = m.alpha
        return sd

    def save(self, path: str | Path, dtype=torch.float16, metadata: dict[str, str] | None = None) -> None:
        write_kohya(family(self.arch).saved_layout(self.state_dict_kohya(), self.denoiser_config), path, dtype, metadata)

    def full_weights(self) -> dict:
        """The weights at full precision with the modules' names: what a training state or a
        snapshot keeps so the saved file can be written again in another precision or with other
        metadata (:func:`kohya_tensors`) without the models or any training."""
        return {"names": [m.lora_name for m in self.loras],
                "network": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}}

    def load_weights(self, path: str | Path, strict: bool = True) -> list[str]:
        """Load a kohya-layout file whose modules match this network's exactly (``strict``), or,
        to start training from it, a subset of them (the rest keep their fresh initialisation;
        returned). Extra modules or other shapes are an error either way."""
        from safetensors.torch import load_file

        mine = self.state_dict_kohya()
        try:  # the family's file layout (FLUX: BFL's fused names) back to the modules trained
            loaded = family(self.arch).trained_layout(load_file(str(path)), self.denoiser_config,
                                                     {m.lora_name: m.lora_down.weight.shape[0] for m in self.loras})
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        missing = check_layout(path, mine, loaded, strict)
        first: dict[int, str] = {}  # a shared down (split_qkv false): every part's must be the one in the file
        with torch.no_grad():
            for k, v in mine.items():
                if k not in loaded:
                    continue
                if v.shape != loaded[k].shape:
                    raise ValueError(f"{path}: {k} has shape {tuple(loaded[k].shape)}, expected {tuple(v.shape)}")
                if id(v) in first and not torch.equal(loaded[first[id(v)]], loaded[k]):
                    raise ValueError(f"{path}: {k} differs from {first[id(v)]}: the file trained them as separate LoRAs "
                                     "(split_qkv true), this network shares one down (network.split_qkv: false)")
                first.setdefault(id(v), k)
                v.copy_(loaded[k].to(v.dtype))
        for m in self.loras:
            m.scale = float(m.alpha) / m.lora_down.weight.shape[0]
        return sorted({k.split(".")[0] for k in missing})


def kohya_tensors(full: dict) -> dict[str, torch.Tensor]:
    """The saved-layout tensors of :meth:`LoRANetwork.full_weights` (a training state holds
    them too): ``loras.<i>.*`` named after module ``i``, as ``state_dict_kohya`` names them; a
    LycoNetwork's own layout, which it keeps beside them (``saved``)."""
    if "saved" in full:
        return full["saved"]
    out = {}
    for i, name in enumerate(full["names"]):
        for part in ("lora_down.weight", "lora_up.weight", "alpha"):
            out[f"{name}.{part}"] = full["network"][f"loras.{i}.{part}"]
    return out


def ema_weights(state: dict) -> dict:
    """The full weights of a training state's EMA (train.ema), in :meth:`LoRANetwork.full_weights`'
    form: kept by the trainer while the averaged weights were applied, or, in a state written
    before it kept them (LoRA only), the state's weights with the averaged tensors in place."""
    if "ema_full" in state:
        return state["ema_full"]
    if "saved" in state:
        raise ValueError("the training state holds no saved-layout EMA weights")
    return {"names": state["names"], "network": {**state["network"], **state["ema"]["shadow"]}}


def write_kohya(tensors: dict, path: str | Path, dtype=torch.float16, metadata: dict[str, str] | None = None) -> None:
    """Save kohya-layout ``tensors`` in ``dtype``, with kohya's precomputed hashes beside its metadata."""
    from safetensors.torch import save_file

    from ..cache import atomic_path
    from .metadata import lora_hashes

    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    seen: set[int] = set()  # one down shared by split modules (split_qkv false, PEFT names): a copy each
    for k, v in tensors.items():
        if v.data_ptr() in seen:
            tensors[k] = v.clone()
        seen.add(tensors[k].data_ptr())
    metadata = dict(metadata or {})
    if any(k.startswith("ss_") for k in metadata):  # kohya's precomputed hashes go with its metadata
        metadata.update(lora_hashes(tensors, metadata))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def check_layout(path, mine: dict, loaded: dict, strict: bool) -> list[str]:
    """The keys of ``mine`` the file lacks; a ValueError for keys it has that we do not (or any lack, ``strict``)."""
    missing, unexpected = sorted(set(mine) - set(loaded)), sorted(set(loaded) - set(mine))
    if unexpected or (missing and strict):
        raise ValueError(
            f"{path}: LoRA layout does not match: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]})"
        )
    return missing
