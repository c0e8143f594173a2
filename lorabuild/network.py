"""A kohya-compatible LoRA ("LoRA-LierLa") for diffusers/transformers SD models.

Facts from sd-scripts ``networks/lora.py`` (commit 48d368f): targets are every Linear
and 1×1 Conv2d inside the UNet's Transformer2D blocks and inside the text encoder's
attention and MLP blocks; names are ``lora_unet_`` / ``lora_te_`` + the module path with
``.`` → ``_``; tensors ``<name>.lora_down.weight``, ``<name>.lora_up.weight`` and a 0-dim
``<name>.alpha``; scale = alpha / dim; ``lora_down`` kaiming-uniform(a=√5), ``lora_up``
zeros. For SD 1.x/2.x diffusers' module paths *are* kohya's names (its UNet mirrors
diffusers); for SDXL kohya's UNet names follow the original SGM layout
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, see ``layout.py``) and the
two text encoders are ``lora_te1_`` / ``lora_te2_``. So AUTOMATIC1111, ComfyUI and
diffusers read the file unchanged.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

UNET_TARGETS = ("Transformer2DModel",)
# LoCon (kohya: conv_dim): the ResNet blocks and resamplers too; their 3×3 convs get
# ``conv_dim``/``conv_alpha``, their Linear and 1×1 convs the ordinary dim/alpha.
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")


class LoRAModule(nn.Module):
    """``y = W x + up(down(x)) · multiplier · alpha/dim`` around an existing Linear or 1×1 conv."""

    def __init__(self, name: str, org: nn.Module, dim: int, alpha: float, dropout: float = 0.0):
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
        self._org = [org]  # a list, so the frozen base module is not registered (or moved) with ours

    def apply_to(self) -> None:
        org = self._org[0]
        self._org_forward = org.forward
        org.forward = self.forward  # instance attribute: nn.Module.__call__ now reaches us

    def restore(self) -> None:
        org = self._org[0]
        if "forward" in org.__dict__:
            del org.forward

    def forward(self, x):
        out = self._org_forward(x)
        if self.multiplier == 0.0:
            return out
        # LoRA weights stay fp32 while the base may run in fp16/bf16.
        lx = self.lora_down(x.to(self.lora_down.weight.dtype))
        if self.dropout and self.training:
            lx = nn.functional.dropout(lx, p=self.dropout)
        lx = self.lora_up(lx)
        return out + (lx * (self.multiplier * self.scale)).to(out.dtype)


def _targets(root: nn.Module, prefix: str, container_classes: tuple[str, ...], path_prefix: str = "",
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


def _te_path_prefix(te: nn.Module) -> str:
    # kohya names follow transformers 4's CLIPTextModel, whose layers sit under
    # `text_model.`; transformers 5 dropped that level. The names must not change with it.
    return "" if hasattr(te, "text_model") else "text_model."


class LoRANetwork(nn.Module):
    def __init__(self, unet, text_encoders: list, dim: int, alpha: float, train_unet: bool = True,
                 train_text_encoder: bool = True, arch: str = "sd1", conv_dim: int | None = None,
                 conv_alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        if arch not in ("sd1", "sd2", "sdxl"):
            raise ValueError(f"unknown model architecture {arch!r}")
        rename = None
        if arch == "sdxl":
            from .layout import to_original, unet_block_map

            blocks = unet_block_map(dict(unet.config))
            rename = lambda path: to_original(path, blocks)  # noqa: E731
        found: list[tuple[str, nn.Module, bool]] = []
        if train_unet:
            found += list(_targets(unet, "lora_unet", UNET_TARGETS, rename=rename))
            if conv_dim:
                found += list(_targets(unet, "lora_unet", UNET_CONV_TARGETS, conv=True, rename=rename))
        n_unet = len(found)
        self.te_counts: list[int] = []
        if train_text_encoder:
            prefixes = ["lora_te1", "lora_te2"] if len(text_encoders) == 2 else ["lora_te"]
            for te, prefix in zip(text_encoders, prefixes):
                mine = list(_targets(te, prefix, TE_TARGETS, _te_path_prefix(te)))
                found += mine
                self.te_counts.append(len(mine))
        names = [n for n, _, _ in found]
        assert len(set(names)) == len(names), "duplicate LoRA module names"
        conv_alpha = conv_dim if conv_alpha is None else conv_alpha
        self.loras = nn.ModuleList(
            LoRAModule(n, m, conv_dim, conv_alpha, dropout) if is3 else LoRAModule(n, m, dim, alpha, dropout)
            for n, m, is3 in found)
        self.n_unet = n_unet

    def apply(self) -> None:
        for m in self.loras:
            m.apply_to()

    def restore(self) -> None:
        for m in self.loras:
            m.restore()

    def set_multiplier(self, value: float) -> None:
        for m in self.loras:
            m.multiplier = float(value)

    def module_count(self) -> tuple[int, int]:
        return self.n_unet, len(self.loras) - self.n_unet

    def param_groups(self, unet_lr: float, te_lr: float, loraplus_ratio: float | None = None,
                     te2_lr: float | None = None) -> list[dict]:
        """One group per (model part, down/up); LoRA+ (kohya loraplus_lr_ratio) multiplies lora_up's rate.
        SDXL's second text encoder has its own rate (``te2_lr``, default ``te_lr``)."""
        groups = []
        n1 = self.te_counts[0] if self.te_counts else 0
        parts = ((self.loras[: self.n_unet], unet_lr), (self.loras[self.n_unet : self.n_unet + n1], te_lr),
                 (self.loras[self.n_unet + n1 :], te_lr if te2_lr is None else te2_lr))
        for mods, lr in parts:
            down = [m.lora_down.weight for m in mods]
            up = [m.lora_up.weight for m in mods]
            if not down:
                continue
            if loraplus_ratio:
                groups += [{"params": down, "lr": lr}, {"params": up, "lr": lr * loraplus_ratio}]
            else:
                groups.append({"params": [p for m in mods for p in (m.lora_down.weight, m.lora_up.weight)], "lr": lr})
        return groups

    def state_dict_kohya(self) -> dict[str, torch.Tensor]:
        sd = {}
        for m in self.loras:
            sd[f"{m.lora_name}.lora_down.weight"] = m.lora_down.weight
            sd[f"{m.lora_name}.lora_up.weight"] = m.lora_up.weight
            sd[f"{m.lora_name}.alpha"] = m.alpha
        return sd

    def save(self, path: str | Path, dtype=torch.float16, metadata: dict[str, str] | None = None) -> None:
        from safetensors.torch import save_file

        from .cache import atomic_path

        from .metadata import lora_hashes

        tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict_kohya().items()}
        metadata = dict(metadata or {})
        if any(k.startswith("ss_") for k in metadata):  # kohya's precomputed hashes go with its metadata
            metadata.update(lora_hashes(tensors, metadata))
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    def load_weights(self, path: str | Path, strict: bool = True) -> list[str]:
        """Load a kohya-layout file whose modules match this network's exactly (``strict``), or,
        to start training from it, a subset of them (the rest keep their fresh initialisation;
        returned). Extra modules or other shapes are an error either way."""
        from safetensors.torch import load_file

        loaded = load_file(str(path))
        mine = self.state_dict_kohya()
        missing, unexpected = sorted(set(mine) - set(loaded)), sorted(set(loaded) - set(mine))
        if unexpected or (missing and strict):
            raise ValueError(
                f"{path}: LoRA layout does not match: {len(missing)} missing keys (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]})"
            )
        with torch.no_grad():
            for k, v in mine.items():
                if k not in loaded:
                    continue
                if v.shape != loaded[k].shape:
                    raise ValueError(f"{path}: {k} has shape {tuple(loaded[k].shape)}, expected {tuple(v.shape)}")
                v.copy_(loaded[k].to(v.dtype))
        for m in self.loras:
            m.scale = float(m.alpha) / m.lora_down.weight.shape[0]
        return sorted({k.split(".")[0] for k in missing})


def from_config(net: dict, unet, text_encoders: list, arch: str, train_text_encoder: bool | None = None) -> LoRANetwork:
    """The network a project's ``network`` section describes, around these models."""
    return LoRANetwork(
        unet, text_encoders, dim=net["dim"], alpha=net["alpha"], train_unet=net["train_unet"],
        train_text_encoder=net["train_text_encoder"] if train_text_encoder is None else train_text_encoder,
        arch=arch, conv_dim=net.get("conv_dim"), conv_alpha=net.get("conv_alpha"), dropout=net.get("dropout") or 0.0,
    )
