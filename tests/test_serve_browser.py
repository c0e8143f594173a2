"""The dashboard in headless Chromium (Playwright), served by uvicorn on a copy of the built
demo: stale stages with reasons, a caption edit, the editor's errors, and builds from the
queue with live progress and the sample grid at the end.

``LORABUILD_SCREENSHOTS=DIR`` saves a screenshot of each view there (the README's; the dataset
view's comes from the tagger test, which shows the suggestions).
"""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)")
CAPTION = "demo/10_redcircle shape/redcircle_00.png"
SHOTS = os.environ.get("LORABUILD_SCREENSHOTS")


class Server:
    """uvicorn in a thread, as `lorabuild serve` runs it."""

    def __init__(self, root: Path):
        import uvicorn

        from lorabuild.serve.app import create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(root), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}/"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=60)


def shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"))


def test_the_dashboard_shows_status_edits_captions_and_runs_a_queue_live(demo):
    from playwright.sync_api import expect, sync_playwright

    demo.edit(lambda d: d["train"].update(epochs=2, learning_rate=0.004))
    with Server(demo.root) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(url)
            # 1. the projects view: the demo's train stale, with the reasons `lorabuild status` gives
            card = page.locator('.card[data-project="demo"]')
            expect(card.locator('.stage[data-stage="train"]')).to_have_text("train: stale", timeout=60_000)
            expect(card.locator('.stage[data-stage="resize"]')).to_have_text("resize: up to date")
            reasons = card.locator('li[data-stage="train"]').all_inner_texts()
            assert "train: train.learning_rate: 0.002 → 0.004" in reasons and "train: train.epochs: 1 → 2" in reasons
            expect(card.locator(".steps")).to_contain_text("40 steps per epoch × 2 epochs = 80 steps")
            shot(page, "projects")

            # 2. a caption edit in the dataset view: textemb stale for exactly that caption
            page.click('#tabs button[data-view="dataset"]')
            image = page.locator(f'.image[data-id="{CAPTION}"]')
            image.locator("textarea").fill("redcircle, shape, edited in the browser")
            image.locator("button", has_text="Save").click()
            expect(image).to_contain_text("saved")
            assert (demo.root / "projects" / CAPTION).with_suffix(".txt").read_text() == "redcircle, shape, edited in the browser\n"
            page.click('#tabs button[data-view="projects"]')
            expect(card.locator('li[data-stage="textemb"]')).to_have_text(["textemb: 1 caption files changed"],
                                                                         timeout=60_000)
            expect(card.locator('.stage[data-stage="latents"]')).to_have_text("latents: up to date")

            # 3. the editor: an invalid edit shows the error at its line; nothing is saved
            page.click('#tabs button[data-view="editor"]')
            expect(page.locator("#editor-state")).to_have_text("saved")
            text = page.locator("#yaml").input_value()
            lines = text.splitlines()
            n = next(i for i, line in enumerate(lines) if line.strip().startswith("batch_size:")) + 1
            lines[n - 1] = "  batch_size: many"
            page.locator("#yaml").fill("\n".join(lines) + "\n")
            expect(page.locator("#problems li")).to_have_count(1)
            expect(page.locator("#problems li")).to_contain_text(f"line {n}:")
            expect(page.locator("#problems li")).to_contain_text("train.batch_size")
            expect(page.locator("#gutter .bad")).to_have_text(str(n))
            expect(page.locator("#save-yaml")).to_be_disabled()
            shot(page, "editor")
            page.locator("#yaml").fill(text)
            expect(page.locator("#problems li")).to_have_count(0)
            assert demo.yaml_path.read_text() == text

            # 4. builds: train, then a queued sample; progress live while training
            page.click('#tabs button[data-view="projects"]')
            card.locator("button", has_text="build train:demo").click()
            page.select_option("#q-stage", "sample")
            page.click('#queue-form button[type="submit"]')
            expect(page.locator('#queue tr[data-target="sample:demo"]')).to_have_count(1)
            page.click('#tabs button[data-view="training"]')
            seen, shots = set(), 0
            deadline = time.monotonic() + 1200
            while time.monotonic() < deadline:
                stats = page.locator("#live-stats")
                if stats.locator('[data-stat="step"] b').count():
                    state = stats.locator('[data-stat="state"] b').inner_text()
                    step = stats.locator('[data-stat="step"] b').inner_text()
                    seen.add((state, step))
                    if state == "running" and step not in ("0 / 80", "80 / 80") and not shots:
                        shot(page, "training")
                        shots = 1
                    if state == "done" and step == "80 / 80":
                        break
                page.wait_for_timeout(250)
            running = {step for state, step in seen if state == "running"}
            assert ("done", "80 / 80") in seen
            assert any(s not in ("0 / 80", "80 / 80") for s in running), seen  # seen mid-run, not only at the end
            assert page.locator('[data-stat="loss"] b').inner_text() != "—"

            # 5. the queued second target runs after the first; its grid appears
            page.click('#tabs button[data-view="builds"]')
            expect(page.locator('#queue tr[data-target="sample:demo"]')).to_have_attribute("data-state", "done",
                                                                                          timeout=600_000)
            entries = {e["target"]: e for e in page.request.get(url + "api/queue").json()["entries"]}
            assert entries["train:demo"]["state"] == "done"
            assert entries["sample:demo"]["started"] >= entries["train:demo"]["ended"]
            page.locator('#queue tr[data-target="train:demo"] button', has_text="Log").click()
            expect(page.locator("#log")).to_contain_text("train:demo")
            shot(page, "builds")
            page.click('#tabs button[data-view="samples"]')
            expect(page.locator('#grid tr[data-row="e000002"] img')).to_have_count(2, timeout=30_000)
            expect(page.locator("#grid img")).to_have_count(2 * 2)  # base and epoch 2 (save_every_n_epochs) × two prompts
            page.wait_for_function("[...document.querySelectorAll('#grid img')].every(i => i.complete)")
            images = page.evaluate("[...document.querySelectorAll('#grid img')].map(i => i.naturalWidth)")
            assert images == [128] * 4  # none broken
            page.locator('#grid tr[data-row="base"] img').nth(0).click()
            page.locator('#grid tr[data-row="e000002"] img').nth(0).click()
            expect(page.locator("#viewer-cells figure")).to_have_count(2)  # side by side
            expect(page.locator("#viewer-cells pre").nth(1)).to_contain_text("<lora:demo:1>")
            expect(page.locator("#viewer-cells pre").nth(1)).to_contain_text("Steps: 8, Sampler:")
            shot(page, "samples")
        finally:
            browser.close()


def test_the_dataset_view_shows_tagger_suggestions_and_a_click_adds_one_to_the_caption(tmp_path):
    """An unbuilt demo with the tiny ONNX tagger (mode merge): the suggestions beside each caption,
    those already in it marked, and a click that writes the tag into the caption file."""
    from playwright.sync_api import expect, sync_playwright

    tt = pytest.importorskip("test_tagger")
    from conftest import init_workspace

    ws = init_workspace(tmp_path / "ws")
    tt.make_tagger(ws.root / "projects" / "tagger-model")
    ws.edit(lambda d: d.update(tagger={"model": "tagger-model", "mode": "merge"}))
    ws.doit("bucket:demo", "tag:demo", build="t1")
    cap = (ws.root / "projects" / CAPTION).with_suffix(".txt")
    before = cap.read_text().strip()
    with Server(ws.root) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(url + "#dataset/demo")
            expect(page.locator("#tagger-line")).to_contain_text("tagger suggestions from the last tag:demo run")
            image = page.locator(f'.image[data-id="{CAPTION}"]')
            chip = image.locator('.sugg[data-tag="simple background"]')
            expect(chip).to_have_text("+ simple background 0.50")
            expect(chip).to_be_enabled()
            uncaptioned = page.locator('.image[data-id="demo/10_redcircle shape/redcircle_07.png"] .sugg')
            expect(uncaptioned.first).to_have_attribute("data-in-caption", "true")  # the tagger's caption is its caption
            chip.click()
            expect(image).to_contain_text("saved")
            expect(image.locator('.sugg[data-tag="simple background"]')).to_have_attribute("data-in-caption", "true")
            expect(image.locator('.sugg[data-tag="simple background"]')).to_be_disabled()
            expect(image.locator("textarea")).to_have_value(f"{before}, simple background")
            assert cap.read_text() == f"{before}, simple background\n"
            shot(page, "dataset")
        finally:
            browser.close()
