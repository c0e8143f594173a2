"""SDXL single files that say what they are: the ``v_pred`` / ``ztsnr`` marker keys ComfyUI reads."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import init_workspace
from lorabuild import models
from test_base_models import _configs_only, _write_single_file


def _marked(tmp_path, cache, name: str, *markers: str):
    """A tiny SDXL single file (and a folder of its configs) with these marker tensors added."""
    folder = models.ensure_builtin("tiny-sdxl", cache)
    f = _write_single_file(folder, tmp_path / f"{name}.safetensors")
    sd = load_file(str(f))
    sd.update({m: torch.tensor([]) for m in markers})  # NoobAI's markers are empty tensors
    save_file(sd, str(f))
    cfg = tmp_path / "tiny-sdxl-config"
    if not cfg.exists():
        _configs_only(folder, cfg)
    return f, cfg


def test_markers_set_v_prediction_and_the_zero_snr_schedule_unless_the_project_says_otherwise(tmp_path):
    cache = tmp_path / "cache"
    f, cfg = _marked(tmp_path, cache, "noob-v", "v_pred", "ztsnr")
    plain, _ = _marked(tmp_path, cache, "plain")
    v_only, _ = _marked(tmp_path, cache, "v-only", "v_pred")
    opts = {"base_model_config": str(cfg)}
    info = lambda path, **o: models.model_info(models.resolve_base_model(str(path), tmp_path, cache, {**opts, **o}))  # noqa: E731
    assert (info(f)["prediction_type"], info(f)["zero_terminal_snr"]) == ("v_prediction", True)
    sched = models.noise_schedule(models.resolve_base_model(str(f), tmp_path, cache, opts))
    assert sched["rescale_betas_zero_snr"] is True and sched["timestep_spacing"] == "trailing"
    assert float(models.load_noise_scheduler(models.resolve_base_model(str(f), tmp_path, cache, opts))
                 .alphas_cumprod[-1]) == 0.0
    assert (info(v_only)["prediction_type"], info(v_only)["zero_terminal_snr"]) == ("v_prediction", False)
    assert (info(plain)["prediction_type"], info(plain)["zero_terminal_snr"]) == ("epsilon", False)
    assert info(f, prediction_type="epsilon")["prediction_type"] == "epsilon"  # the project's word wins
    why = models.single_file_markers(str(f), tmp_path, {"prediction_type": "epsilon"})
    assert why[0] == "the checkpoint has a v_pred key, but prediction_type: epsilon is set"
    assert models.single_file_markers(str(plain), tmp_path, {}) == []


def test_a_marked_checkpoint_trains_and_samples_with_v_prediction_and_zero_snr(tmp_path):
    ws = init_workspace(tmp_path / "ws")
    models_dir = ws.root / "projects" / "models"
    models_dir.mkdir()
    _marked(models_dir, ws.root / "cache", "noob-vpred", "v_pred", "ztsnr")
    folders = sorted(p.name for p in ws.data.iterdir() if p.is_dir())

    def edit(d):  # the demo once through on the marked file: 5 steps
        d.update(base_model="models/noob-vpred.safetensors", base_model_config="models/tiny-sdxl-config")
        d["dataset"] = {"concepts": [{"path": f"demo/{f}", "repeats": 1} for f in folders]}
        d["train"].update(epochs=1, save_every_n_epochs=None)
        d["sample"].update(prompts=d["sample"]["prompts"][:1], steps=2, sampler="heun")

    ws.edit(edit)
    plan = subprocess.run([sys.executable, "-m", "lorabuild", "plan", "demo"], cwd=ws.root, capture_output=True,
                          text=True)
    assert plan.returncode == 0, plan.stderr
    assert "  base model: v-prediction: the checkpoint has a v_pred key" in plan.stdout
    assert "  base model: zero terminal SNR: the checkpoint has a ztsnr key" in plan.stdout
    ws.doit("sample:demo", build="vpred")
    entry = ws.manifest("train")["items"][0]
    key = json.loads((ws.root / "cache/objects/train" / entry["hash"][:2] / f"{entry['hash'][2:]}.json").read_text())
    assert key["key"]["noise"]["prediction_type"] == "v_prediction"
    assert key["key"]["noise"]["rescale_betas_zero_snr"] is True
    with safe_open(str(ws.root / "output/demo/demo.safetensors"), "pt") as fh:
        md = fh.metadata()
    assert (md["modelspec.prediction_type"], md["ss_zero_terminal_snr"]) == ("v", "True")
    report = ws.report("sample")
    assert report["computed"] > 0
    assert any("zero-terminal-SNR schedule, which heun cannot follow" in n for n in report["notes"])
