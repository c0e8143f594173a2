"""Write lorabuild/data/clip_tokenizer/ (vocab.json, merges.txt, configs) from CLIP's BPE merges.

The merges ship in PyPI's open_clip_torch wheel (open_clip/bpe_simple_vocab_16e6.txt.gz,
MIT licence). vocab.json is derived exactly as CLIP's own SimpleTokenizer builds its
encoder: 256 byte symbols, the same with "</w>", one entry per merge, then the two
special tokens — 49408 ids.

    python scripts/make_clip_tokenizer.py [open_clip_torch-*.whl]
"""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "lorabuild" / "data" / "clip_tokenizer"
N_MERGES = 49152 - 256 - 2  # open_clip tokenizer.py: merges[1:49152-256-2+1]
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" with OpenAI CLIP's tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_merges(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        raw = gzip.decompress(z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")).decode("utf-8")
    return raw.split("\n")[1 : N_MERGES + 1]


def main() -> None:
    if len(sys.argv) > 1:
        wheel = Path(sys.argv[1])
    else:
        tmp = Path(tempfile.mkdtemp())
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(tmp), "open_clip_torch"], check=True)
        wheel = next(tmp.glob("open_clip_torch-*.whl"))
    merges = read_merges(wheel)
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split(" ")) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    OUT.mkdir(parents=True, exist_ok=True)
    text = {
        "vocab.json": json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",  # HF's merges format
    }
    for name, body in text.items():
        with open(OUT / name, "w", encoding="utf-8", newline="\n") as fh:  # same bytes on Windows
            fh.write(body)

    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(OUT / "vocab.json"), str(OUT / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77)
    assert tok("a photo of a cat").input_ids == CAT_IDS
    tok.save_pretrained(str(OUT))
    # transformers >= 5 also writes tokenizer.json: 3.6 MB that repeats vocab + merges and
    # loads slower than building from them; transformers 4 writes special_tokens_map.json,
    # whose tokens tokenizer_config.json already names. Both versions load the folder
    # from vocab.json + merges.txt + tokenizer_config.json alone.
    for extra in ("tokenizer.json", "special_tokens_map.json"):
        (OUT / extra).unlink(missing_ok=True)
    assert CLIPTokenizer.from_pretrained(str(OUT))("a photo of a cat").input_ids == CAT_IDS
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
