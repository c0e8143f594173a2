"""The sample grid (rows = epochs, columns = prompts) and an ``index.html`` beside it."""
from __future__ import annotations

import html
from pathlib import Path

from .cache import atomic_path, atomic_write

LABEL_W, LABEL_H = 72, 16


def grid(cells: list[list[Path]], row_labels: list[str], col_labels: list[str], out: Path) -> tuple[int, int]:
    """Write the grid image; returns its size. Every row has one cell per column."""
    img = grid_image(cells, row_labels, col_labels)
    with atomic_path(out) as tmp:
        img.save(tmp, format="PNG")
    return img.size


def grid_image(cells: list[list[Path]], row_labels: list[str], col_labels: list[str]):
    """The grid as a PIL image (rows = ``row_labels``, one cell per column). Every label is drawn
    in full: wrapped to its column (or the row margin) over as many lines as it needs, the label
    band as tall as the longest. Labels that fit one line leave the layout as it always was."""
    from PIL import Image, ImageDraw

    tiles = [[Image.open(p).convert("RGB") for p in row] for row in cells]
    cw = max(t.width for row in tiles for t in row)
    ch = max(t.height for row in tiles for t in row)
    font = ImageDraw.Draw(Image.new("RGB", (1, 1))).getfont()  # the one draw.text uses
    step = line_height(font)
    cols = [wrap(label, font, cw - 4) for label in col_labels]
    rows = [wrap(label, font, LABEL_W - 4) for label in row_labels]
    band = LABEL_H + step * (max(map(len, cols), default=1) - 1)
    rh = max([ch] + [step * len(lines) + 4 for lines in rows])  # a row as tall as its label, at least
    img = Image.new("RGB", (LABEL_W + cw * len(col_labels), band + rh * len(row_labels)), "white")
    draw = ImageDraw.Draw(img)
    for c, lines in enumerate(cols):
        for i, line in enumerate(lines):
            draw.text((LABEL_W + c * cw + 2, 2 + i * step), line, fill="black", font=font)
    for r, (lines, row) in enumerate(zip(rows, tiles)):
        top = band + r * rh + rh // 2 - 6 - step * (len(lines) - 1) // 2  # centred beside the row
        for i, line in enumerate(lines):
            draw.text((2, top + i * step), line, fill="black", font=font)
        for c, tile in enumerate(row):
            img.paste(tile, (LABEL_W + c * cw, band + r * rh))
    return img


def line_height(font) -> int:
    """The distance between two lines of ``font``: ascent + descent (FreeType), else a bitmap
    font's tallest glyph box plus a gap."""
    if hasattr(font, "getmetrics"):
        ascent, descent = font.getmetrics()
        return ascent + descent
    box = font.getbbox("Ag|")
    return box[3] - box[1] + 3


def wrap(text: str, font, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels of ``font``: broken at spaces, and a word
    wider than a whole line broken between its characters; nothing is left out."""
    fits = lambda s: font.getlength(s) <= width  # noqa: E731
    lines: list[str] = []
    for word in text.split():
        if lines and fits(f"{lines[-1]} {word}"):
            lines[-1] += f" {word}"
            continue
        while not fits(word) and len(word) > 1:
            n = max(1, next((k for k in range(len(word) - 1, 0, -1) if fits(word[:k])), 1))
            lines.append(word[:n])
            word = word[n:]
        lines.append(word)
    return lines or [""]


def settings_text(s: dict) -> str:
    """One image's settings as a person reads them (the page beside the grid): prompt, negative
    prompt, then the numbers in A1111's ``Key: value`` form."""
    lines = [f"Prompt: {s['prompt']}"] + ([f"Negative prompt: {s['negative']}"] if s.get("negative") else [])
    sampler = A1111_SAMPLERS.get(s["sampler"], s["sampler"])
    lines.append(f"Steps: {s['steps']}, Sampler: {sampler}, CFG scale: {s['cfg']:g}, Seed: {s['seed']}, "
                 f"Size: {s['width']}x{s['height']}, LoRA weight: {s['lora_weight']:g}")
    return "\n".join(lines)


def index_html(rows: list[tuple[str, list[tuple[str, dict]]]], out: Path, title: str) -> None:
    """A page with the grid and every image with its full settings (``rows``: label → [(file, settings)])."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif}td,th{vertical-align:top;padding:4px;text-align:left}"
             "th{max-width:260px;white-space:normal;overflow-wrap:anywhere;font-weight:500}"
             "pre{font-size:11px;max-width:260px;white-space:pre-wrap;overflow-wrap:anywhere}</style>",
             f"<h1>{html.escape(title)}</h1><p><img src='grid.png' alt='grid'></p><table>"]
    if rows:  # every prompt in full above its column (wrapped, never cut)
        parts.append("<tr><th></th>" + "".join(f"<th class='prompt'>{html.escape(s['prompt'])}</th>"
                                                 for _, s in rows[0][1]) + "</tr>")
    for label, cells in rows:
        parts.append(f"<tr><th>{html.escape(label)}</th>")
        for fname, settings in cells:
            parts.append(f"<td><img src='{html.escape(fname)}' alt='{html.escape(settings['prompt'])}'>"
                         f"<pre>{html.escape(settings_text(settings))}</pre></td>")
        parts.append("</tr>")
    parts.append("</table>")
    with atomic_write(out, "w") as fh:
        fh.write("\n".join(parts) + "\n")


# A1111's sampler names (modules/sd_samplers_*.py), as its "parameters" text shows them.
A1111_SAMPLERS = {"ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "dpm++_2m": "DPM++ 2M",
                  "dpm++_2m_karras": "DPM++ 2M Karras", "pndm": "PLMS", "lms": "LMS", "heun": "Heun"}


def a1111_parameters(s: dict, lora_name: str | None, lora_hash: str | None) -> str:
    """One image's settings as A1111 writes them into its PNGs (``parameters``): prompt with the
    ``<lora:name:weight>`` tag, ``Negative prompt:``, then the ``Key: value`` line. Tools that
    read A1111 images (its PNG Info tab, Civitai, ComfyUI nodes) parse this text."""
    prompt = s["prompt"] + (f" <lora:{lora_name}:{s['lora_weight']:g}>" if lora_name else "")
    fields = [f"Steps: {s['steps']}", f"Sampler: {A1111_SAMPLERS.get(s['sampler'], s['sampler'])}",
              f"CFG scale: {s['cfg']:g}", f"Seed: {s['seed']}", f"Size: {s['width']}x{s['height']}"]
    if lora_name and lora_hash:
        fields.append(f'Lora hashes: "{lora_name}: {lora_hash[:12]}"')  # A1111: the short hash of the tensor bytes
    lines = [prompt] + ([f"Negative prompt: {s['negative']}"] if s.get("negative") else []) + [", ".join(fields)]
    return "\n".join(lines)


def with_text_chunk(png: bytes, key: str, text: str) -> bytes:
    """``png`` with a text chunk right after IHDR: tEXt when Latin-1 will do, else iTXt (UTF-8),
    as PIL's ``PngInfo.add_text`` chooses; the pixels are not re-encoded."""
    import struct
    import zlib

    try:
        kind, data = b"tEXt", key.encode("latin-1") + b"\0" + text.encode("latin-1")
    except UnicodeEncodeError:
        kind, data = b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8")
    chunk = struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr_end = 8 + 8 + struct.unpack(">I", png[8:12])[0] + 4  # signature, IHDR length+type, data, crc
    return png[:ihdr_end] + chunk + png[ihdr_end:]
