"""kohya's aspect-ratio buckets, from numbers only.

Reproduces sd-scripts ``library/model_util.py:make_bucket_resolutions`` and
``library/train_util.py:BucketManager.select_bucket`` / ``round_to_steps`` (commit
48d368f) and the centre crop of ``trim_and_resize_if_required``.
"""
from __future__ import annotations

import math
from typing import NamedTuple


def make_buckets(max_area: int, min_size: int, max_size: int, step: int) -> list[tuple[int, int]]:
    """The bucket set: the square of area ``max_area`` plus, for each width on the ladder
    ``min_size, min_size + step, … ≤ max_size``, the tallest step-multiple height that keeps
    the area within ``max_area`` (capped at ``max_size``), in both orientations. Sorted."""
    side = int(math.sqrt(max_area) // step) * step
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // step) * step)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += step
    return sorted(resos)


def select_bucket(w: int, h: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest to ``w/h``; an exact size match wins.

    Ties go to the first bucket in sorted order, as numpy's ``argmin`` does in kohya.
    """
    if (w, h) in buckets:
        return (w, h)
    ar = w / h
    errors = [abs(bw / bh - ar) for bw, bh in buckets]
    return buckets[errors.index(min(errors))]


def _round_to_steps(x: float, step: int) -> int:
    x = int(x + 0.5)
    return x - x % step


def _no_upscale_size(w: int, h: int, max_area: int, step: int) -> tuple[int, int]:
    """kohya's ``bucket_no_upscale`` resize: never enlarge; shrink an image over ``max_area``
    keeping its aspect ratio (the bucket is then this size cut down to multiples of ``step``)."""
    if w * h <= max_area:
        return (w, h)
    ar = w / h
    resized_w = math.sqrt(max_area * ar)
    resized_h = max_area / resized_w
    # Round the width or the height to steps, whichever keeps the aspect ratio closer.
    # A side that rounds to 0 steps makes its candidate unusable (kohya divides by it).
    bw = _round_to_steps(resized_w, step)
    hw = _round_to_steps(bw / ar, step)
    ar_w = bw / hw if hw else math.inf
    bh = _round_to_steps(resized_h, step)
    ar_h = _round_to_steps(bh * ar, step) / bh if bh else math.inf
    if abs(ar_w - ar) < abs(ar_h - ar):
        return (bw, int(bw / ar + 0.5))
    return (int(bh * ar + 0.5), bh)


class Fit(NamedTuple):
    resized: tuple[int, int]  # size the image is resized to before cropping
    crop: tuple[int, int, int, int]  # (left, top, right, bottom) in resized coordinates
    scale: float
    cropped_share: float  # share of the resized image's pixels cut away
    ar_error: float  # bucket aspect ratio minus image aspect ratio
    upscaled: bool


def fit(w: int, h: int, bw: int, bh: int) -> Fit:
    """Scale ``w``×``h`` to cover ``bw``×``bh`` (kohya's rounding), then centre-crop to it."""
    ar, bucket_ar = w / h, bw / bh
    scale = bh / h if ar > bucket_ar else bw / w
    return _crop(w, h, (int(w * scale + 0.5), int(h * scale + 0.5)), (bw, bh))


class TooNarrow(ValueError):
    """Under ``bucket_no_upscale`` an image (after shrinking to the area) has a side below one step:
    its bucket would be 0 pixels wide. kohya divides by that zero; here it is a clear error."""


def no_upscale_fit(w: int, h: int, max_area: int, step: int) -> Fit:
    """The bucket and fit under ``bucket_no_upscale``: shrink if over the area, then crop."""
    rw, rh = _no_upscale_size(w, h, max_area, step)
    if min(rw, rh) < step:
        raise TooNarrow(f"{w}x{h} is {rw}x{rh} within the bucket area, a side below one step ({step} px): "
                        "without upscaling no bucket holds it")
    return _crop(w, h, (rw, rh), (rw - rw % step, rh - rh % step))


def working_size(w: int, h: int, max_side: int) -> tuple[int, int]:
    """The resize stage's working copy size: longest side at most ``max_side``, never enlarged."""
    if max(w, h) <= max_side:
        return (w, h)
    s = max_side / max(w, h)
    return (max(1, round(w * s)), max(1, round(h * s)))


def _crop(w: int, h: int, resized: tuple[int, int], bucket: tuple[int, int]) -> Fit:
    (rw, rh), (bw, bh) = resized, bucket
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return Fit(
        resized=(rw, rh),
        crop=(left, top, left + bw, top + bh),
        scale=rw / w,
        cropped_share=1.0 - (bw * bh) / (rw * rh),
        ar_error=bw / bh - w / h,
        upscaled=rw > w,
    )
