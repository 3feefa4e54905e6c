"""The parser of ``extract`` (run by :mod:`speechssl.extract`)."""

from __future__ import annotations

import argparse

from speechssl_cli.arguments import add_device, layers

EXTRACT = """\
Extract the hidden states of chosen layers for every utterance of a corpus, to disk.

    %(prog)s MODEL INPUT... --output DIR [--layers 6,12] [--format npy|shards|safetensors]

MODEL is a run folder (its model.pt), a model file (pretraining or CTC), or hf:NAME_OR_PATH. INPUT is
audio files, directories, manifests or shard directories. --layers: indices (0 is the context
input), all or last. npy writes layer{K}/{file}.npy and index.tsv; shards, webdataset tars with
layer{K}.npy next to each utterance's metadata; safetensors, files of --per-file utterances. The run
is resumable: what DIR already holds is skipped; DIR/extract.json records the settings, and a run
with other ones is refused unless --overwrite. speechssl.extract.read_features reads any format back.
"""


def add_extract(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a run folder, a model file, or hf:NAME_OR_PATH")
    parser.add_argument("inputs", nargs="+", help="audio files, directories, manifests or shard directories")
    parser.add_argument("--output", required=True, help="the folder to write (and to resume in)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete what an earlier extraction wrote to --output first, whatever its settings")
    parser.add_argument("--layers", type=layers, default="last", help="e.g. 6,12, or all, or last")
    parser.add_argument("--format", choices=["npy", "shards", "safetensors"], default="npy",
                        help="how the features are written")
    parser.add_argument("--per-file", type=int, default=1000, help="utterances per tar or safetensors file")
    add_device(parser)
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                        help="compute precision on a GPU (features are saved as float32 or float16)")
    parser.add_argument("--save-dtype", choices=["float32", "float16"], default="float32",
                        help="the saved features' type")
    parser.add_argument("--normalize", action="store_true",
                        help="zero mean, unit variance per utterance, for models pretrained with data.normalize")
    parser.add_argument("--batch-seconds", type=float, default=300.0, help="padded audio per batch")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="longer recordings are windowed")
    parser.add_argument("--window-seconds", type=float, default=30.0, help="window length for long recordings")
    parser.add_argument("--overlap-seconds", type=float, default=4.0,
                        help="overlap of consecutive windows (less than --window-seconds)")
    parser.add_argument("--workers", type=int, default=2, help="processes decoding shards")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
