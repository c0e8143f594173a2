"""A kohya-compatible LoRA ("LoRA-LierLa") for diffusers/transformers SD models.

Facts from sd-scripts ``networks/lora.py`` (commit 48d368f): targets are every Linear
and 1×1 Conv2d inside the UNet's Transformer2D blocks and inside the text encoder's
attention and MLP blocks; names are ``lora_unet_`` / ``lora_te_`` + the module path with
``.`` → ``_``; tensors ``<name>.lora_down.weight``, ``<name>.lora_up.weight`` and a 0-dim
``<name>.alpha``; scale = alpha / dim; ``lora_down`` kaiming-uniform(a=√5), ``lora_up``
zeros. For SD 1.x/2.x diffusers' module paths *are* kohya's names (its UNet mirrors
diffusers), so AUTOMATIC1111, ComfyUI and diffusers read the file unchanged.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

UNET_TARGETS = ("Transformer2DModel",)
TE_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")


class LoRAModule(nn.Module):
    """``y = W x + up(down(x)) · multiplier · alpha/dim`` around an existing Linear or 1×1 conv."""

    def __init__(self, name: str, org: nn.Module, dim: int, alpha: float):
        super().__init__()
        self.lora_name = name
        if isinstance(org, nn.Conv2d):
            self.lora_down = nn.Conv2d(org.in_channels, dim, 1, bias=False)
            self.lora_up = nn.Conv2d(dim, org.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(org.in_features, dim, bias=False)
            self.lora_up = nn.Linear(dim, org.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = float(alpha) / dim
        self.multiplier = 1.0
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
        lx = self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype)))
        return out + (lx * (self.multiplier * self.scale)).to(out.dtype)


def _targets(root: nn.Module, prefix: str, container_classes: tuple[str, ...], path_prefix: str = ""):
    """(kohya name, module) for every Linear / 1×1 Conv2d inside the named container blocks."""
    for name, block in root.named_modules():
        if block.__class__.__name__ not in container_classes:
            continue
        for child_name, child in block.named_modules():
            is_1x1 = isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1)
            if isinstance(child, nn.Linear) or is_1x1:
                yield f"{prefix}_{path_prefix}{name}.{child_name}".replace(".", "_"), child


def _te_path_prefix(te: nn.Module) -> str:
    # kohya names follow transformers 4's CLIPTextModel, whose layers sit under
    # `text_model.`; transformers 5 dropped that level. The names must not change with it.
    return "" if hasattr(te, "text_model") else "text_model."


class LoRANetwork(nn.Module):
    def __init__(self, unet, text_encoders: list, dim: int, alpha: float, train_unet: bool = True,
                 train_text_encoder: bool = True, arch: str = "sd1"):
        super().__init__()
        if arch not in ("sd1", "sd2"):
            raise NotImplementedError(f"LoRA layout for {arch} is not implemented yet")
        found: list[tuple[str, nn.Module]] = []
        if train_unet:
            found += list(_targets(unet, "lora_unet", UNET_TARGETS))
        n_unet = len(found)
        if train_text_encoder:
            for te in text_encoders:
                found += list(_targets(te, "lora_te", TE_TARGETS, _te_path_prefix(te)))
        names = [n for n, _ in found]
        assert len(set(names)) == len(names), "duplicate LoRA module names"
        self.loras = nn.ModuleList(LoRAModule(n, m, dim, alpha) for n, m in found)
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

    def param_groups(self, unet_lr: float, te_lr: float) -> list[dict]:
        groups = []
        unet_p = [p for m in self.loras[: self.n_unet] for p in m.parameters()]
        te_p = [p for m in self.loras[self.n_unet :] for p in m.parameters()]
        if unet_p:
            groups.append({"params": unet_p, "lr": unet_lr})
        if te_p:
            groups.append({"params": te_p, "lr": te_lr})
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

        tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict_kohya().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata or {})

    def load_weights(self, path: str | Path) -> None:
        """Load a kohya-layout file whose modules match this network's exactly."""
        from safetensors.torch import load_file

        loaded = load_file(str(path))
        mine = self.state_dict_kohya()
        missing, unexpected = sorted(set(mine) - set(loaded)), sorted(set(loaded) - set(mine))
        if missing or unexpected:
            raise ValueError(
                f"{path}: LoRA layout does not match: {len(missing)} missing keys (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]})"
            )
        with torch.no_grad():
            for k, v in mine.items():
                if v.shape != loaded[k].shape:
                    raise ValueError(f"{path}: {k} has shape {tuple(loaded[k].shape)}, expected {tuple(v.shape)}")
                v.copy_(loaded[k].to(v.dtype))
        for m in self.loras:
            m.scale = float(m.alpha) / m.lora_down.weight.shape[0]
