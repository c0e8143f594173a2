"""kohya's aspect-ratio bucketing, reproduced: the bucket set and the bucket and resize size of
33 image sizes, in normal and ``bucket_no_upscale`` mode.

Expected values were derived once from kohya sd-scripts' published algorithm
(``library/model_util.py:make_bucket_resolutions``, ``library/train_util.py:
BucketManager.select_bucket`` and ``round_to_steps``, numpy ``argmin`` tie-breaking) with
resolution 512, min 256, max 1024, step 64, and are written here literally.
"""
from __future__ import annotations

import pytest

from lorabuild.buckets import TooNarrow, fit, make_buckets, no_upscale_fit, select_bucket, working_size
from conftest import init_workspace

KOHYA_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]

# (image size), bucket, resize size | no_upscale: bucket, resize size
TABLE = [
    ((512, 512), (512, 512), (512, 512), (512, 512), (512, 512)),
    ((512, 768), (384, 640), (427, 640), (384, 576), (384, 576)),
    ((768, 512), (640, 384), (640, 427), (576, 384), (576, 384)),
    ((1024, 1024), (512, 512), (512, 512), (512, 512), (512, 512)),
    ((2048, 2048), (512, 512), (512, 512), (512, 512), (512, 512)),
    ((100, 100), (512, 512), (512, 512), (64, 64), (100, 100)),
    ((64, 64), (512, 512), (512, 512), (64, 64), (64, 64)),
    ((300, 200), (640, 384), (640, 427), (256, 192), (300, 200)),
    ((200, 300), (384, 640), (427, 640), (192, 256), (200, 300)),
    ((1920, 1080), (640, 384), (683, 384), (640, 384), (683, 384)),
    ((1080, 1920), (384, 640), (384, 683), (384, 640), (384, 683)),
    ((3000, 1000), (832, 256), (832, 277), (768, 256), (768, 256)),
    ((1000, 3000), (256, 832), (277, 832), (256, 768), (256, 768)),
    ((4000, 500), (1024, 256), (2048, 256), (1024, 128), (1024, 128)),
    ((500, 4000), (256, 1024), (256, 2048), (128, 1024), (128, 1024)),
    ((513, 771), (384, 640), (426, 640), (384, 576), (384, 577)),
    ((771, 513), (640, 384), (640, 426), (576, 384), (577, 384)),
    ((640, 480), (576, 448), (597, 448), (512, 384), (512, 384)),
    ((480, 640), (448, 576), (448, 597), (384, 512), (384, 512)),
    ((800, 600), (576, 448), (597, 448), (512, 384), (512, 384)),
    ((1024, 768), (576, 448), (597, 448), (512, 384), (512, 384)),
    ((1280, 720), (640, 384), (683, 384), (640, 384), (683, 384)),
    ((720, 1280), (384, 640), (384, 683), (384, 640), (384, 683)),
    ((2560, 1440), (640, 384), (683, 384), (640, 384), (683, 384)),
    ((1366, 768), (640, 384), (683, 384), (640, 384), (683, 384)),
    ((1000, 1001), (512, 512), (512, 513), (512, 512), (512, 513)),
    ((333, 777), (320, 768), (329, 768), (320, 768), (333, 777)),
    ((5000, 5000), (512, 512), (512, 512), (512, 512), (512, 512)),
    ((256, 1024), (256, 1024), (256, 1024), (256, 1024), (256, 1024)),
    ((1024, 256), (1024, 256), (1024, 256), (1024, 256), (1024, 256)),
    ((832, 1216), (384, 640), (438, 640), (384, 576), (394, 576)),
    ((1216, 832), (576, 448), (655, 448), (576, 384), (576, 394)),
    ((3072, 3000), (512, 512), (524, 512), (448, 448), (459, 448)),
]


def test_bucket_set_matches_kohya():
    assert make_buckets(512 * 512, 256, 1024, 64) == KOHYA_512
    assert len(KOHYA_512) == 17


@pytest.mark.parametrize("size, bucket, resized, nu_bucket, nu_resized", TABLE, ids=[f"{s[0]}x{s[1]}" for s, *_ in TABLE])
def test_bucket_choice_and_resize(size, bucket, resized, nu_bucket, nu_resized):
    w, h = size
    chosen = select_bucket(w, h, KOHYA_512)
    assert chosen == bucket
    f = fit(w, h, *chosen)
    assert f.resized == resized
    left, top, right, bottom = f.crop
    assert (right - left, bottom - top) == bucket
    assert (left, top) == ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2)  # centre crop
    nu = no_upscale_fit(w, h, 512 * 512, 64)
    assert nu.resized == nu_resized
    assert (nu.crop[2] - nu.crop[0], nu.crop[3] - nu.crop[1]) == nu_bucket
    assert not nu.upscaled


def test_fit_reports_what_was_cut():
    f = fit(512, 768, 384, 640)  # DESIGN.md: a 512×768 image goes to 384×640
    assert f.resized == (427, 640) and f.crop == (21, 0, 405, 640)
    assert f.cropped_share == pytest.approx(1 - 384 * 640 / (427 * 640))
    assert f.ar_error == pytest.approx(384 / 640 - 512 / 768)
    assert not f.upscaled and fit(100, 100, 512, 512).upscaled


def test_contact_sheet_redraw_copies_drawn_cells_and_matches_a_fresh_drawing(tmp_path):
    """Adding an image redraws its page; the cells already drawn are copied from the old sheet,
    and the result looks like the page drawn from scratch (JPEG noise apart)."""
    import numpy as np
    from PIL import Image

    from lorabuild.cache import Store
    from lorabuild.stages import bucket

    store = Store(tmp_path / "cache", "resize", ".png")
    rng = np.random.default_rng(0)

    def entry(i: int) -> dict:
        src = f"{i:064x}"
        store.path(src).parent.mkdir(parents=True, exist_ok=True)
        pixels = np.broadcast_to(rng.integers(0, 255, 3, dtype=np.uint8), (96, 128, 3)).copy()  # a colour each
        pixels[20:50, 30:90] = rng.integers(0, 255, 3, dtype=np.uint8)
        Image.fromarray(pixels).save(store.path(src))
        return {"id": f"p/img{i:03d}.png", "src": src, "bucket": [128, 96], "resized": [128, 96], "crop": [0, 0, 128, 96]}

    entries = [entry(i) for i in range(0, 20, 2)]
    out = tmp_path / "sheets"
    out.mkdir()
    bucket.contact_sheets(store, entries, out)
    entries = sorted(entries + [entry(5)], key=lambda e: e["id"])  # lands mid-page: later cells move
    drawn = []
    real = bucket._sheet
    bucket._sheet = lambda store_, group, path, thumb, columns, found, sources: (
        drawn.append(sum(f is None for f in found)), real(store_, group, path, thumb, columns, found, sources))[1]
    try:
        bucket.contact_sheets(store, entries, out)
    finally:
        bucket._sheet = real
    assert drawn == [1]  # one page, one cell drawn from its image; ten copied
    incremental = np.asarray(Image.open(out / "128x96.jpg"), dtype=np.int16)
    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    bucket.contact_sheets(store, entries, fresh_dir)
    fresh = np.asarray(Image.open(fresh_dir / "128x96.jpg"), dtype=np.int16)
    assert incremental.shape == fresh.shape == (2 * 144, 8 * 128, 3)
    assert np.abs(incremental - fresh).mean() < 1.5  # recompressed, every cell in its place
    shifted = np.roll(fresh, 128, axis=1)  # a cell off by one place is far off
    assert np.abs(incremental - shifted).mean() > 20


def test_no_upscale_refuses_an_image_narrower_than_one_step_by_name_not_by_zero_division():
    with pytest.raises(TooNarrow, match="40x700 .* below one step \\(64 px\\)"):
        no_upscale_fit(40, 700, 512 * 512, 64)
    with pytest.raises(TooNarrow):  # shrunk to the area first: a panorama's short side falls below a step
        no_upscale_fit(20000, 200, 512 * 512, 64)
    assert no_upscale_fit(64, 700, 512 * 512, 64).crop == (0, 30, 64, 670)
    assert working_size(1536, 1024, 1024) == (1024, 683) and working_size(800, 600, 1024) == (800, 600)


def _image(path, w: int, h: int) -> None:
    from PIL import Image

    Image.new("RGB", (w, h), (200, 30, 30)).save(path)


def test_narrow_images_under_no_upscale_and_working_copies_shrunk_below_their_bucket_are_named(tmp_path):
    """A narrow image under no_upscale stops the bucket stage with a message naming it (no traceback),
    or is left out with small_images: reject; a panorama shrunk by resize.max_side below its bucket is
    named by the bucket stage and by `lorabuild plan`, with the max_side that keeps its pixels."""
    import subprocess
    import sys

    ws = init_workspace(tmp_path / "ws")
    folder = next(p for p in ws.data.iterdir() if p.is_dir())
    _image(folder / "pano.png", 1024, 128)  # demo: max_side 256 → 256x32; its 256x64 bucket wants 512x64
    proc = subprocess.run([sys.executable, "-m", "lorabuild", "plan", "demo"], cwd=ws.root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert ("1 image(s) are shrunk to resize.max_side (256) below what their bucket needs (bucket.resolution 128, "
            "bucket.max_reso 256)") in proc.stdout
    assert "pano.png (1024x128 → 256x32 → bucket 256x64); resize.max_side: 512 keeps every pixel" in proc.stdout
    ws.doit("bucket:demo", build="pano")
    notes = " ".join(ws.report("bucket")["notes"])
    assert "1 image(s) were shrunk to resize.max_side (256)" in notes and "pano.png (1024x128 → 256x32 → 256x64)" in notes
    ws.edit(lambda d: d["resize"].update(max_side=512))
    ws.doit("bucket:demo", build="pano512")
    assert not ws.report("bucket")["notes"]
    proc = subprocess.run([sys.executable, "-m", "lorabuild", "plan", "demo"], cwd=ws.root, capture_output=True, text=True)
    assert "resize.max_side" not in proc.stdout

    (folder / "pano.png").unlink()
    _image(folder / "narrow.png", 40, 300)
    ws.edit(lambda d: d["bucket"].update(no_upscale=True))
    proc = ws.doit("bucket:demo", build="narrow", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out and "ZeroDivisionError" not in out
    assert "narrow.png: bucket.no_upscale: its working copy 40x300 is 40x300 within the bucket area, a side below one " \
           "step (64 px)" in out
    ws.edit(lambda d: d["bucket"].update(small_images="reject"))
    ws.doit("bucket:demo", build="rejected")
    assert any("rejected" in n and "narrow.png" in n for n in ws.report("bucket")["notes"])
