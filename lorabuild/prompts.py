"""Sample prompts: YAML entries and kohya's prompt-line syntax, resolved against project defaults.

kohya's syntax (sd-scripts ``train_util.line_to_prompt_dict``): one prompt per line,
``#`` lines and blank lines skipped, options after `` --`` (case-insensitive): ``--n``
negative, ``--w``/``--h`` size, ``--s`` steps, ``--l`` CFG scale, ``--d`` seed, ``--ss``
sampler, plus ``--m`` LoRA weight (ai-toolkit's name) and ``--g``, FLUX.1 dev's embedded guidance (kohya's). A bad value is reported and
skipped, not fatal, as in kohya; sizes are floored to a multiple of 8 (at least 64) and
steps clamped to 1–1000.
"""
from __future__ import annotations

import re
from pathlib import Path

SETTINGS = ("negative", "width", "height", "steps", "cfg", "seed", "sampler", "lora_weight")
OPTIONS = {"n": ("negative", str), "w": ("width", int), "h": ("height", int), "s": ("steps", int),
           "l": ("cfg", float), "d": ("seed", int), "ss": ("sampler", str), "m": ("lora_weight", float),
           "g": ("guidance", float)}  # FLUX.1 dev's embedded guidance (kohya's --g); in the settings only when given
# kohya/A1111 sampler names → ours
SAMPLER_ALIASES = {"k_euler": "euler", "k_euler_a": "euler_a", "euler_ancestral": "euler_a", "k_lms": "lms",
                   "k_heun": "heun", "dpmsolver++": "dpm++_2m", "k_dpm_2m": "dpm++_2m",
                   "dpm++_2m_karras": "dpm++_2m_karras", "k_dpmpp_2m_karras": "dpm++_2m_karras"}
SAMPLER_NAMES = ("ddim", "euler", "euler_a", "dpm++_2m", "dpm++_2m_karras", "pndm", "lms", "heun")


def parse_line(line: str, warnings: list[str] | None = None) -> dict | None:
    """One kohya prompt line → ``{"prompt": …, <option>: value}``; None for comments/blank lines."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    head, *opts = re.split(r"\s+--", " " + line)
    out: dict = {"prompt": head.strip()}
    for opt in opts:
        m = re.match(r"([A-Za-z]+)\s*(.*)$", opt.strip(), re.S)
        if not m or m.group(1).lower() not in OPTIONS:
            _warn(warnings, f"unknown prompt option '--{opt.strip()}' in: {line}")
            continue
        name, cast = OPTIONS[m.group(1).lower()]
        try:
            value = cast(m.group(2).strip())
        except ValueError:
            _warn(warnings, f"bad value for --{m.group(1)} ('{m.group(2).strip()}') in: {line}")
            continue
        if name == "sampler":
            value = SAMPLER_ALIASES.get(value.lower(), value.lower())
            if value not in SAMPLER_NAMES:
                _warn(warnings, f"unknown sampler '{m.group(2).strip()}' in: {line}")
                continue
        out[name] = value
    return out


def _warn(warnings: list[str] | None, text: str) -> None:
    if warnings is not None:
        warnings.append(text)


def read_prompt_file(path: Path, warnings: list[str] | None = None) -> list[dict]:
    text = path.read_bytes().decode("utf-8-sig")
    return [d for d in (parse_line(ln, warnings) for ln in text.splitlines()) if d is not None]


def resolve(sample_cfg: dict, project_root: Path, warnings: list[str] | None = None, native: int = 512) -> list[dict]:
    """Every prompt (YAML list, then the prompt file) with the project-wide defaults filled in
    (``native``: the model's own size, where the project sets none)."""
    entries: list[dict] = []
    for p in sample_cfg["prompts"]:
        entries.append(parse_line(p, warnings) or {"prompt": p} if isinstance(p, str) else dict(p))
    if sample_cfg.get("prompt_file"):
        entries += read_prompt_file(project_root / sample_cfg["prompt_file"], warnings)
    out = []
    for e in entries:
        s = {"prompt": e["prompt"], **{k: e.get(k, sample_cfg[k]) for k in SETTINGS}}
        if e.get("guidance") is not None:
            s["guidance"] = float(e["guidance"])
        s["width"], s["height"] = (native if v is None else v for v in (s["width"], s["height"]))
        s["width"], s["height"] = (max(64, int(v) // 8 * 8) for v in (s["width"], s["height"]))
        s["steps"] = min(1000, max(1, int(s["steps"])))
        out.append(s)
    return out
