"""The real T5 tokenizer lorabuild ships (T5 v1.1's, data/t5xxl_tokenizer) and where it is used:
a real-size FLUX.1 / SD 3.5 T5-XXL gets it, the tiny built-ins keep the tiny one."""
import json
import struct

import pytest

from lorabuild import models, separate
from lorabuild.families import family
from lorabuild.families.t5_tokenizers import T5XXL_DIR, TINY_T5_DIR


def _laid_out(tmp_path, configs: str, fam: str):
    work = tmp_path / "work"
    models._copy_configs(models.CONFIGS_DIR / configs, family(fam), work)  # as a single file's conversion does
    return work


def _header_only(path, tensors: dict) -> None:
    """A safetensors file with ``tensors`` ({key: (shape, dtype, bytes per item)}) in its header and its
    data region left sparse: what the header checks read, at real sizes, with nothing allocated."""
    header, offset = {}, 0
    for key, (shape, dtype, size) in tensors.items():
        n = size
        for d in shape:
            n *= d
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)


@pytest.mark.parametrize("configs,fam,tok", [("flux-dev", "flux", "tokenizer_2"), ("flux-schnell", "flux", "tokenizer_2"),
                                             ("sd3/large", "sd3", "tokenizer_3"), ("sd3/medium", "sd3", "tokenizer_3")])
def test_a_real_size_t5_gets_t5s_own_tokenizer_with_its_known_ids(tmp_path, configs, fam, tok):
    """The shipped configs' T5-XXL (32 128 rows) gets T5 v1.1's tokenizer, read through lorabuild's
    own loader (models.load_tokenizer → T5TokenizerFast): the ids transformers' T5 docs show."""
    work = _laid_out(tmp_path, configs, fam)
    t = models.load_tokenizer(work, which=tok)
    assert type(t).__name__.startswith("T5Tokenizer") and len(t) == 32100  # transformers 5 names the fast one T5Tokenizer
    assert t("Hello world").input_ids == [8774, 296, 1]
    assert t("a photo of a cat").input_ids == [3, 9, 1202, 13, 3, 9, 1712, 1]
    assert t("<extra_id_0>").input_ids == [32099, 1] and (t.pad_token_id, t.eos_token_id, t.unk_token_id) == (0, 1, 2)
    padded = t(["a cat"], padding="max_length", max_length=16, truncation=True).input_ids[0]
    assert padded == [3, 9, 1712, 1] + [0] * 12
    assert not (work / tok / "NOTICE").exists() and not list((work / tok).glob("*.gz"))
    assert (work / "tokenizer" / "vocab.json").is_file()  # the CLIP tokenizer is untouched


def test_the_tiny_builtins_keep_the_tiny_tokenizer(tmp_path):
    """A tiny T5 (its vocabulary the tiny tokenizer's) is laid out with the tiny one, not T5 v1.1's."""
    tiny = json.loads((TINY_T5_DIR / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    assert family("flux").tokenizer_source("tokenizer_2", {"vocab_size": len(tiny)}) == TINY_T5_DIR
    assert family("sd3").tokenizer_source("tokenizer_3", {"vocab_size": 32128}) == T5XXL_DIR
    assert family("flux").tokenizer_source("tokenizer", {"vocab_size": 32128}) != T5XXL_DIR  # CLIP's slot


def test_a_real_size_t5xxl_file_passes_the_separate_file_checks(tmp_path):
    """A real-size t5xxl file (header only, sparse) with the shipped FLUX.1 configs: the tokenizer
    check (once a refusal: 'needs T5's own tokenizer') and the file's header check both pass; a T5
    of another vocabulary (UMT5's 256 384) is refused naming the field."""
    work = _laid_out(tmp_path, "flux-dev", "flux")
    encoders = {"clip_l": "text_encoder", "t5xxl": "text_encoder_2"}
    fields = {n: f"text_encoders.{n}" for n in encoders}
    separate.check_tokenizer(family("flux"), work, encoders, fields)
    t5 = tmp_path / "t5xxl_fp8_e4m3fn.safetensors"
    _header_only(t5, {"shared.weight": ((32128, 4096), "F8_E4M3", 1),
                      "encoder.block.0.layer.0.SelfAttention.q.weight": ((4096, 4096), "F8_E4M3", 1)})
    separate._check_file("text_encoders.t5xxl", t5, work / "text_encoder_2")
    clip = tmp_path / "clip_l.safetensors"
    _header_only(clip, {"text_model.embeddings.token_embedding.weight": ((49408, 768), "F16", 2),
                        "text_model.encoder.layers.0.mlp.fc1.weight": ((3072, 768), "F16", 2)})
    separate._check_file("text_encoders.clip_l", clip, work / "text_encoder")
    with pytest.raises(models.ModelError, match="text_encoders.clip_l: .* is T5-XXL, but this model.s clip_l is CLIP-L"):
        separate._check_file("text_encoders.clip_l", t5, work / "text_encoder")
    cfg = json.loads((work / "text_encoder_2" / "config.json").read_text(encoding="utf-8"))
    (work / "text_encoder_2" / "config.json").write_text(json.dumps({**cfg, "vocab_size": 256384}), encoding="utf-8")
    with pytest.raises(models.ModelError, match=r"text_encoders.t5xxl: a 256384-token T5 needs a tokenizer lorabuild "
                                                r"does not ship .*set base_model_config to a diffusers FLUX.1 folder"):
        separate.check_tokenizer(family("flux"), work, encoders, fields)


def test_the_shipped_tokenizer_is_the_one_its_notice_names():
    """The gzipped tokenizer.json is byte for byte the one scripts/fetch_t5_tokenizer.py derives (its sha256)."""
    import gzip
    import hashlib
    import runpy

    from lorabuild.resources import PACKAGE_DIR

    script = runpy.run_path(str(PACKAGE_DIR.parent / "scripts" / "fetch_t5_tokenizer.py"))
    data = gzip.decompress((T5XXL_DIR / "tokenizer.json.gz").read_bytes())
    assert hashlib.sha256(data).hexdigest() == script["JSON_SHA256"] and len(data) == 2424064
    assert script["JSON_SHA256"] in (T5XXL_DIR / "NOTICE").read_text(encoding="utf-8")
