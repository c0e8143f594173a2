"""The original (CompVis LDM / Stability SGM) UNet layout, in diffusers' terms.

SD 1.x/2.x single files and SDXL files name the UNet's blocks ``input_blocks.N.M`` /
``middle_block.M`` / ``output_blocks.N.M``; diffusers names them ``down_blocks.i.resnets.j``
and so on. kohya's SDXL LoRA names follow the original layout (its SDXL UNet is written that
way), so the LoRA network needs this map, and the tests use it to write single files. The
numbering follows from the config alone: each level has ``layers_per_block`` blocks plus a
resampler (down) or ``layers_per_block + 1`` blocks, the last carrying the upsampler (up).
"""
from __future__ import annotations

# a ResNet block's parts: diffusers → original
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_block_map(cfg: dict) -> dict[str, str]:
    """{diffusers block prefix: original block prefix} for a UNet2DConditionModel config."""
    n, per = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    blocks = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
              "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
              "mid_block.resnets.1": "middle_block.2"}
    for i in range(n):
        for j in range(per):
            blocks[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{i * (per + 1) + j + 1}.0"
            blocks[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{i * (per + 1) + j + 1}.1"
        if i < n - 1:
            blocks[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (per + 1)}.0.op"
        attn = "CrossAttn" in cfg["up_block_types"][i]
        for j in range(per + 1):
            blocks[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{i * (per + 1) + j}.0"
            blocks[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{i * (per + 1) + j}.1"
        if i < n - 1:
            blocks[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{i * (per + 1) + per}.{2 if attn else 1}"
    return blocks


def to_original(path: str, blocks: dict[str, str]) -> str:
    """A diffusers module or tensor path in the original layout (``path`` unchanged outside the map)."""
    prefix = max((p for p in blocks if path == p or path.startswith(p + ".")), key=len, default=None)
    if prefix is None:
        return path
    rest = path[len(prefix) + 1:]
    if ".resnets." in prefix and rest:
        head, _, tail = rest.partition(".")
        rest = RESNET.get(head, head) + ("." + tail if tail else "")
    return blocks[prefix] + ("." + rest if rest else "")
