"""llm-tokenizer: learn a byte-level BPE on your files (llm.tokenizer.train_bpe), or see
how a tokenizer splits a text.

    llm-tokenizer --train 'corpus/*.txt' --vocab-size 4096 --out tok.json
    llm-tokenizer --encode "Hello, world" [--tokenizer tok.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llm.cli import checked_by, command, new_parser
from llm.data import read_document, resolve_sources
from llm.tokenizer import VOCAB_SIZES, check_tokenizer_spec, get_tokenizer, save_tokenizer, train_bpe


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("llm-tokenizer", __doc__)
    parser.add_argument("--train", nargs="+", metavar="SOURCE", help="learn a BPE on these files/globs/folders")
    parser.add_argument("--vocab-size", type=VOCAB_SIZES, default=4096, help="tokens of the learned BPE (default 4096)")
    parser.add_argument("--out", default="tokenizer.json", help="where --train saves the tokenizer")
    parser.add_argument("--encode", metavar="TEXT", help="print the ids of TEXT")
    parser.add_argument(
        "--tokenizer",
        default="gpt2",
        type=checked_by(lambda spec: check_tokenizer_spec(spec, learnable=False), "TOKENIZER"),
        help='for --encode: "gpt2" or a saved tokenizer file',
    )
    return parser


@command("llm-tokenizer")
def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.train or args.encode is not None):
        parser.error("nothing to do: pass --train SOURCE... and/or --encode TEXT")
    if args.train:
        texts = [read_document(path) for path in resolve_sources(args.train)]
        tokenizer = train_bpe(texts, args.vocab_size, name=Path(args.out).stem)
        save_tokenizer(tokenizer, args.out)
        print(f"saved a {tokenizer.n_vocab}-token BPE to {args.out}")
    if args.encode is not None:
        print(get_tokenizer(args.tokenizer).encode(args.encode, allowed_special="all"))


if __name__ == "__main__":
    main()
