"""Derive the CLIP BPE tokenizer files (vocab.json, merges.txt) from OpenAI's BPE file.

OpenAI ships CLIP's tokenizer as one gzip file of merges (`bpe_simple_vocab_16e6.txt.gz`,
also inside the `open_clip_torch` wheel). Hugging Face's CLIPTokenizer and Apple's Swift
tokenizer read a `vocab.json` + `merges.txt` pair instead; this script writes that pair the
way OpenAI's own tokenizer builds its vocabulary, so the committed files under
`models/tokenizer/` are reproducible from the public source:

    pip download --no-deps -d /tmp/oc open_clip_torch
    unzip -o /tmp/oc/open_clip_torch-*.whl 'open_clip/bpe_simple_vocab_16e6.txt.gz' -d /tmp/oc
    python scripts/build_clip_tokenizer_files.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz
"""
import argparse
import gzip
import json
from pathlib import Path

VOCAB_SIZE = 49408
MERGE_COUNT = VOCAB_SIZE - 2 * 256 - 2  # byte tokens, byte+</w> tokens, start/end tokens


def bytes_to_unicode():
    """GPT-2/CLIP's reversible byte -> printable unicode map (a fixed table, not in any library API)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def build(bpe_gz: Path):
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:MERGE_COUNT + 1]]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bpe_gz", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("-o", type=Path, default=Path(__file__).resolve().parent.parent / "models" / "tokenizer",
                        help="output folder (default: models/tokenizer)")
    args = parser.parse_args()
    vocab, merges = build(args.bpe_gz)
    args.o.mkdir(parents=True, exist_ok=True)
    (args.o / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    (args.o / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.o}")


if __name__ == "__main__":
    main()
