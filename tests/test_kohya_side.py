"""bench/kohya_side.py and bench/kohya_setup.py (issue 26) without running either trainer or
installing anything: the figures read from timestamped output lines, the module check between
the two saved files, the export of a pinned commit from a clone, and the clear error when kohya
cannot be installed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import kohya_setup  # noqa: E402
import kohya_side  # noqa: E402
from common import STEP  # noqa: E402


def test_figures_leave_out_step_one_and_the_first_image():
    case = kohya_side.Case("kohya", rc=0, rss_gib=7.5)
    case.lines = [(1.0, "INFO loading model"), (3.0, "  0%|          | 0/8 [00:00<?, ?it/s]"),  # before the log line
                  (10.0, "INFO caching latents."), (11.0, " 12%|█         | 1/8 [00:01<?, ?it/s]"),
                  (13.0, " 50%|█████     | 4/8"), (18.0, "100%|██████████| 8/8 [00:08]"),
                  (30.0, "steps:  33%|███▎      | 1/3 [00:05<00:10, loss=0.1]"),
                  (32.0, "steps:  67%|██████▋   | 2/3"), (32.5, "steps:  67%|██████▋   | 2/3 [again]"),
                  (35.0, "steps: 100%|██████████| 3/3")]
    f = kohya_side.figures(case, kohya_side.KOHYA_STEP, "caching latents", kohya_side.BAR)
    assert f["first"] == 30.0 and f["steps"] == 3
    assert f["s/step"] == pytest.approx(2.5)  # median of 2.0 and 3.0: step 1's 30 s is left out
    assert f["cache"] == pytest.approx((18.0 - 11.0) / 7)  # images 1 → 8, the bar before the log line ignored
    assert f["rss"] == 7.5


def test_lorabuild_output_is_read_by_its_own_patterns():
    case = kohya_side.Case("lorabuild", rc=0)
    case.lines = [(5.0, "latents:bench:  50%|█████     | 1/2 [00:01<00:01,  1.00img/s]"),
                  (6.5, "latents:bench: 100%|██████████| 2/2"),
                  (9.0, "train:  50%|█████     | 1/2 [loss 0.2]"), (13.0, "train: 100%|██████████| 2/2")]
    bar = kohya_side.re.compile(r"latents:bench:\s+" + kohya_side.BAR.pattern)
    f = kohya_side.figures(case, STEP, "latents:bench", bar)
    assert (f["first"], f["s/step"], f["cache"]) == (9.0, 4.0, 1.5)


def test_a_progress_update_counts_when_it_arrives_not_at_the_next_one():
    # tqdm's update is "\r" + text with no delimiter after it: the text is the news
    assert kohya_side.pieces("\rtrain:  33%|###3      | 1/3 [01:03<02:07]") == ["train:  33%|###3      | 1/3 [01:03<02:07]"]
    assert kohya_side.pieces("INFO a\nINFO b\r\n\r") == ["INFO a", "INFO b"]


def test_a_tool_that_did_not_run_has_no_figures():
    assert kohya_side.figures(kohya_side.Case("kohya", error="not installed"), STEP, "x", STEP) == {}


def _lora(path: Path, te_prefix: str, rank: int = 32) -> Path:
    save_file({f"{te_prefix}text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(rank, 768),
               f"{te_prefix}text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(16.0),
               "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(320, rank, 1, 1)}, str(path))
    return path


def test_same_modules_after_name_normalisation_and_shape_differences_reported(tmp_path):
    kohya = kohya_side.lora_shapes(_lora(tmp_path / "k.safetensors", "lora_te_"))
    ours = kohya_side.lora_shapes(_lora(tmp_path / "l.safetensors", "lora_te1_"))
    assert kohya_side.same_modules(kohya, ours) == "same 2 modules, 3 tensors, shapes match"
    other = kohya_side.lora_shapes(_lora(tmp_path / "o.safetensors", "lora_te1_", rank=16))
    verdict = kohya_side.same_modules(kohya, other)
    assert verdict.startswith("DIFFER") and "2 shapes differ" in verdict
    assert kohya_side.same_modules(kohya, kohya_side.lora_shapes(tmp_path / "missing.safetensors")).startswith("not")


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_export_takes_the_pinned_commit_not_the_work_tree(tmp_path):
    src = tmp_path / "sd-scripts"
    src.mkdir()
    _git(src, "init", "-q")
    (src / "train_network.py").write_text("PINNED = True\n")
    (src / "requirements.txt").write_text("toml==0.10.2\n")
    _git(src, "add", ".")
    _git(src, "commit", "-qm", "one")
    pinned = _git(src, "rev-parse", "HEAD")
    (src / "train_network.py").write_text("PINNED = False\n")
    _git(src, "commit", "-qam", "two")
    (src / "train_network.py").write_text("LOCAL EDIT\n")
    tree = kohya_setup.export(str(src), pinned, tmp_path / "home")
    assert (tree / "train_network.py").read_text() == "PINNED = True\n"
    assert (tree / "requirements.txt").is_file()


def test_not_installed_and_no_source_is_a_clear_error(tmp_path):
    with pytest.raises(kohya_setup.SetupError, match="pass --kohya-src"):
        kohya_setup.ensure(None, tmp_path / "home")
    with pytest.raises(kohya_setup.SetupError, match="neither a folder nor a git URL"):
        kohya_setup.ensure(str(tmp_path / "nowhere"), tmp_path / "home")


def test_the_variants_reach_kohyas_command_line(tmp_path):
    p = Path("x")
    plain = kohya_side.kohya_cmd(p, p, p, p, p, p / "tok", 256, 8)
    both = kohya_side.kohya_cmd(p, p, p, p, p, p / "tok", 256, 8, checkpointing=True, unet_only=True)
    assert "--gradient_checkpointing" not in plain and "--network_train_unet_only" not in plain
    assert both[:len(plain)] == plain and both[len(plain):] == ["--gradient_checkpointing", "--network_train_unet_only"]
