"""Write lorabuild/data/t5_tokenizer/: a small T5-shaped tokenizer for the tiny FLUX/SD3 built-ins.

T5's own (SentencePiece unigram, 32 100 pieces) ships too, for the real T5-XXL
(lorabuild/data/t5xxl_tokenizer, scripts/fetch_t5_tokenizer.py); the tiny models' T5 has a vocabulary
of a few hundred rows, so theirs is this one, built offline and deterministically with the `tokenizers` library in T5's
shape: the same special tokens and ids (<pad> 0, </s> 1, <unk> 2), a unigram model over "▁"-prefixed
pieces (Metaspace pre-tokenizer, as SentencePiece), case kept as T5 keeps it, and "</s>" appended to
every sequence. Its vocabulary is every ASCII letter (both cases), digit and punctuation mark (alone and
word-initial, so any text tokenizes) plus common caption words, scored by length so whole
words win. Run again only to change it: ``python scripts/make_t5_tokenizer.py``.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

OUT = Path(__file__).resolve().parents[1] / "lorabuild" / "data" / "t5_tokenizer"
WORDS = """a an the of and with in on at to for by from is are photo picture image painting drawing portrait
close up closeup view style art artwork detailed high quality best masterpiece realistic red green blue yellow
black white grey gray orange purple pink brown dark light bright background foreground simple plain solid
square circle triangle star shape shapes small large big tiny man woman person people girl boy child face
eyes hair smile standing sitting looking wearing dress shirt hat cat dog bird tree flower sky sun water city
street house room night day sunset forest mountain sea beach car sks ohwx character concept token""".split()


def build() -> Tokenizer:
    specials = ["<pad>", "</s>", "<unk>"]
    singles = list(string.ascii_letters + string.digits + string.punctuation)
    pieces = [(s, 0.0) for s in specials]
    seen = set(specials)
    for p in ["▁"] + [f"▁{c}" for c in singles] + singles + [f"▁{w}" for w in WORDS]:
        if p not in seen:
            seen.add(p)
            # longer pieces score higher (less negative): a whole word beats its letters
            pieces.append((p, -10.0 + min(len(p), 9)))
    tok = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                      special_tokens=[("</s>", 1)])
    return tok


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tok = build()
    tok.save(str(OUT / "tokenizer.json"))
    config = {"tokenizer_class": "T5Tokenizer", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
              "model_max_length": 512, "extra_ids": 0, "additional_special_tokens": []}
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (OUT / "special_tokens_map.json").write_text(json.dumps(
        {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n", encoding="utf-8")
    print(f"{OUT}: {tok.get_vocab_size()} pieces")


if __name__ == "__main__":
    main()
