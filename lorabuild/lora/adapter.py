"""The network a project's ``network`` section describes: kohya's LoRA/LoCon (:mod:`lorabuild.lora.network`)
or a LyCORIS type (:mod:`lorabuild.lora.lyco`, built on it). Above both, so neither imports the other
back: lyco subclasses the LoRA network, and this picks between them.
"""
from __future__ import annotations

from .blocks import block_settings
from . import flow_select
from ..families import family
from .network import TE_TARGETS, UNET_TARGETS, LoRANetwork, NetworkConfigError


def from_config(net: dict, unet, text_encoders: list, arch: str, train_text_encoder: bool | None = None) -> LoRANetwork:
    """The network a project's ``network`` section describes, around these models. Options that
    do not fit the model raise ``NetworkConfigError`` naming the field."""
    try:
        blocks = block_settings(net, arch)
        # FLUX/SD 3.5 block selection (kohya train_*_block_indices, train_blocks), against this transformer
        keep = flow_select.block_filter(net, arch, dict(getattr(unet, "config", {}) or {}))
        # kohya's in_dims (FLUX.1) / emb_dims (SD 3.5): LoRAs on the input embedders too
        embedders = flow_select.embedders(net, arch, unet) if net["train_unet"] else []
    except ValueError as exc:
        raise NetworkConfigError(str(exc)) from None
    cls, extra = LoRANetwork, {}
    if net.get("type") not in (None, "lora", "locon"):  # LoHa, LoKr, DoRA…: LyCORIS' modules (optional package)
        from .lyco import LycoNetwork, module_maker

        cls, extra = LycoNetwork, {"make": module_maker(net), "train_norm": bool(net.get("train_norm"))}
    network = cls(
        unet, text_encoders, dim=net["dim"], alpha=net["alpha"], train_unet=net["train_unet"],
        train_text_encoder=net["train_text_encoder"] if train_text_encoder is None else train_text_encoder,
        arch=arch, conv_dim=net.get("conv_dim"), conv_alpha=net.get("conv_alpha"), dropout=net.get("dropout") or 0.0,
        unet_targets=net.get("unet_target_modules") or UNET_TARGETS,
        te_targets=flow_select.te_targets(net, net.get("text_encoder_target_modules") or TE_TARGETS),
        exclude_patterns=net.get("exclude_patterns") or (), include_patterns=net.get("include_patterns") or (),
        blocks=blocks, rank_dropout=net.get("rank_dropout") or 0.0, module_dropout=net.get("module_dropout") or 0.0,
        **({"keep": keep} if keep else {}), **({"embedders": embedders} if embedders else {}), **extra)
    # kohya's default: one LoRA on each fused qkv / linear1 (a LyCORIS type trains the fused layers anyway)
    if net.get("split_qkv") is False and cls is LoRANetwork:
        network.share_down(family(arch).fused_parts(network.denoiser_config))
    return network
