"""Feature extraction to disk: hidden states of chosen layers for every utterance of a corpus.

    speechssl extract MODEL INPUT... --output DIR [--layers 6,12] [--format npy|shards|safetensors]

MODEL is a pretraining run folder (its ``model.pt``), a model file (pretraining or CTC), or
``hf:NAME_OR_PATH`` (a Hugging Face Wav2Vec2 or Wav2Vec2-Conformer checkpoint). INPUT is audio
files, directories, manifests or shard directories (as for ``speechssl transcribe``).
``--layers``: indices (0 is the context input), ``all`` or ``last`` (see
:mod:`speechssl.features`).

Formats, in DIR:

- ``npy``: ``layer{K}/{file}.npy`` of shape ``(frames, dim)`` per utterance and layer, and
  ``index.tsv`` (id, file, frames, the utterance's metadata as JSON); ``{file}`` is the id made
  safe for a file name plus a hash of the exact id, so distinct ids never share a file;
- ``shards``: webdataset tars ``features-NNNNNN.tar`` whose samples hold ``layer{K}.npy`` next to
  the utterance's metadata (``json``, with ``frames`` and ``layers`` added);
- ``safetensors``: ``features-NNNNNN.safetensors`` with tensors ``{id}/layer{K}`` and the ids and
  metadata in the file's header.

Utterances are batched by padded audio length (``--batch-seconds``) on the GPU when there is one,
optionally in fp16 or bf16 (``--dtype``); each runs on its own samples, so its features do not
depend on the batching. A recording longer than ``--max-seconds`` goes through overlapping
windows (``--window-seconds``, ``--overlap-seconds``) stitched to the single pass's frames.
One run at a time writes DIR (it is locked). The run is resumable: what DIR already holds
(complete files only) is skipped, so a killed extraction started again finishes the rest without
duplicates, and the same command run again on a finished DIR writes nothing. ``extract.json``
records the settings (model, inputs, layers, format, dtype, normalisation); a run with other ones is
refused, unless ``--overwrite`` is given: it deletes what an extraction wrote to DIR first.
:func:`read_features` reads any of the three formats back.

Utterances that cannot be extracted are skipped, counted by reason in the summary's ``skipped``
and named on stderr: unreadable audio, fewer samples than the model's receptive field
(``too_short``), an id that appeared earlier in the inputs (``duplicate_id``: the first one's
features are kept) or an id holding a tab or line break (``bad_id``: index.tsv could not list it).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from speechssl.data.audio import normalize_audio, pad_waveforms
from speechssl.data.inputs import SAMPLE_RATE, Utterance, batches, read_utterances, skip
from speechssl.device import pick_device
from speechssl.features import LayerFeatures, min_input_samples
from speechssl.locking import FolderLock, FolderLocked
from speechssl.models.encoder import SpeechEncoder
from speechssl.models.loading import load_speech_model

INDEX_HEADER = "id\tfile\tframes\tmeta\n"


def load_encoder(source: str) -> tuple[SpeechEncoder, bool]:
    """The model named by ``source`` (:func:`speechssl.models.loading.load_speech_model`) and
    whether it expects normalised audio (a CTC model says so; for the others, ``--normalize``)."""
    model = load_speech_model(source)
    return model, bool(getattr(model, "normalize_audio", False))


def _meta(utt: Utterance) -> dict:
    """The utterance's metadata as written next to its features (the reader's own keys left out)."""
    return {**{k: v for k, v in utt.meta.items() if not k.startswith("__")}, "id": utt.id}


def _file_name(uid: str) -> str:
    """A file name (no extension) for an utterance id: the id's characters that are safe in a file
    name, for reading, then a hash of the exact id. The hash keeps apart ids that the safe part
    makes equal (``sub/x`` and ``sub_x``, ``a b`` and ``a_b``; ``A`` and ``a`` on a case-insensitive
    disk); the id itself is kept in ``index.tsv``."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", uid).strip("._")[:80] or "utt"
    digest = hashlib.sha256(uid.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{readable}-{digest}"


def _complete_lines(path: Path) -> list[str]:
    """The lines of ``path`` that end in a newline: a killed writer's torn last line is left out.
    Read as bytes, so that only a line feed ends a line (``str.splitlines`` also splits on characters
    that JSON written with ``ensure_ascii=False`` keeps, such as U+2028, and text mode on CR)."""
    return path.read_bytes().decode("utf-8").split("\n")[:-1]


class NpyWriter:
    """One ``.npy`` per utterance and layer; ``index.tsv`` lists an utterance once its files are
    in place, and is what a resumed run trusts."""

    def __init__(self, out: Path, layers: list[int]):
        self.out, self.layers = out, layers
        for k in layers:
            (out / f"layer{k}").mkdir(parents=True, exist_ok=True)
        self.index = out / "index.tsv"
        lines = _complete_lines(self.index) if self.index.is_file() else []
        if not lines or lines[0] + "\n" != INDEX_HEADER:  # a new folder, or killed while starting it
            lines = [INDEX_HEADER.rstrip("\n")]
        self.done = {line.split("\t")[0] for line in lines[1:]}
        self.index.write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))  # torn line dropped

    def write(self, utt: Utterance, states: list[np.ndarray]) -> None:
        name = _file_name(utt.id)
        for k, state in zip(self.layers, states, strict=True):
            partial = self.out / f"layer{k}" / f"{name}.partial.npy"
            np.save(partial, state)
            partial.replace(self.out / f"layer{k}" / f"{name}.npy")
        with self.index.open("a", encoding="utf-8") as f:
            f.write(f"{utt.id}\t{name}.npy\t{len(states[0])}\t{json.dumps(_meta(utt), ensure_ascii=False)}\n")
        self.done.add(utt.id)

    def close(self) -> None:
        pass


class _ChunkWriter:
    """Files of ``per_file`` utterances, each written whole under a temporary name and renamed:
    a killed run leaves no partial file that counts."""

    suffix = ""

    def __init__(self, out: Path, layers: list[int], per_file: int):
        self.out, self.layers, self.per_file = out, layers, per_file
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(f"*{self.suffix}.partial"):
            stale.unlink()
        pattern = re.compile(rf"features-(\d+){re.escape(self.suffix)}")
        existing = [p for p in sorted(out.iterdir()) if pattern.fullmatch(p.name)]
        self.done: set[str] = set()
        for path in existing:
            self.done.update(self.ids_in(path))
        # After the last file, not after the count: a file deleted by hand must not make the next
        # one overwrite a file that is still there.
        self.number = max((int(pattern.fullmatch(p.name)[1]) + 1 for p in existing), default=0)
        self.pending: list[tuple[Utterance, list[np.ndarray]]] = []

    def write(self, utt: Utterance, states: list[np.ndarray]) -> None:
        self.pending.append((utt, states))
        self.done.add(utt.id)
        if len(self.pending) == self.per_file:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.out / f"features-{self.number:06d}{self.suffix}"
        partial = path.with_name(path.name + ".partial")
        self.save(partial)
        partial.replace(path)
        self.number += 1
        self.pending = []

    def close(self) -> None:
        self.flush()

    def ids_in(self, path: Path) -> list[str]:
        raise NotImplementedError

    def save(self, path: Path) -> None:
        raise NotImplementedError


class ShardWriter(_ChunkWriter):
    """webdataset tars: per utterance ``{key}.json`` (its metadata, frames, layers) and
    ``{key}.layer{K}.npy``."""

    suffix = ".tar"

    def ids_in(self, path: Path) -> list[str]:
        import webdataset as wds

        return [json.loads(s["json"])["id"] for s in wds.DataPipeline(wds.SimpleShardList([str(path)]),
                                                                     wds.tarfile_to_samples())]

    def save(self, path: Path) -> None:
        import webdataset as wds

        with wds.TarWriter(str(path)) as sink:
            for i, (utt, states) in enumerate(self.pending):
                meta = {**_meta(utt), "frames": len(states[0]), "layers": self.layers}
                sink.write({"__key__": f"{self.number:06d}_{i:06d}", "json": meta,
                            **{f"layer{k}.npy": s for k, s in zip(self.layers, states, strict=True)}})


class SafetensorsWriter(_ChunkWriter):
    """safetensors files: tensors ``{id}/layer{K}``; the header's metadata holds ``ids`` and
    ``meta`` (JSON)."""

    suffix = ".safetensors"

    def ids_in(self, path: Path) -> list[str]:
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            return json.loads(f.metadata()["ids"])

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        tensors = {f"{utt.id}/layer{k}": np.ascontiguousarray(s)
                   for utt, states in self.pending for k, s in zip(self.layers, states, strict=True)}
        metadata = {"ids": json.dumps([u.id for u, _ in self.pending]), "layers": json.dumps(self.layers),
                    "meta": json.dumps({u.id: _meta(u) for u, _ in self.pending}, ensure_ascii=False)}
        save_file(tensors, str(path), metadata=metadata)


def read_features(folder: str | Path) -> Iterator[tuple[str, dict[int, np.ndarray], dict]]:
    """``(id, {layer: (frames, dim) array}, metadata)`` for every utterance an extraction wrote to
    ``folder``, whatever its format."""
    folder = Path(folder)
    if (folder / "index.tsv").is_file():
        lines = _complete_lines(folder / "index.tsv")[1:]
        layers = sorted(int(d.name[5:]) for d in folder.iterdir() if d.is_dir() and re.fullmatch(r"layer\d+", d.name))
        for line in lines:
            uid, name, _, meta = line.split("\t", 3)
            yield uid, {k: np.load(folder / f"layer{k}" / name) for k in layers}, json.loads(meta)
    elif tars := sorted(folder.glob("features-*.tar")):
        import webdataset as wds

        for sample in wds.DataPipeline(wds.SimpleShardList([str(t) for t in tars]), wds.tarfile_to_samples()):
            meta = json.loads(sample["json"])
            yield meta["id"], {k: np.load(io.BytesIO(sample[f"layer{k}.npy"])) for k in meta["layers"]}, meta
    else:
        from safetensors import safe_open
        from safetensors.numpy import load_file

        for path in sorted(folder.glob("features-*.safetensors")):
            with safe_open(str(path), "np") as f:
                header = f.metadata()
            tensors, layers, metas = load_file(str(path)), json.loads(header["layers"]), json.loads(header["meta"])
            for uid in json.loads(header["ids"]):
                yield uid, {k: tensors[f"{uid}/layer{k}"] for k in layers}, metas[uid]


def check_settings(out: Path, settings: dict) -> None:
    """Record what an extraction writes (``extract.json``); resuming into ``out`` with other
    settings would mix two extractions, so it is refused, naming what differs."""
    path = out / "extract.json"
    if path.is_file():
        before = json.loads(path.read_text())
        differ = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if differ:
            raise ValueError(f"{out} holds an extraction with other settings "
                             f"({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in differ.items())}); "
                             "choose another --output, or pass --overwrite to replace it")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1) + "\n")


def clear_outputs(out: Path) -> None:
    """Delete what an extraction writes in ``out`` (settings, index, layer folders, feature files,
    unfinished ``.partial`` files), and nothing else: ``out`` may hold other files."""
    if not out.is_dir():
        return
    for path in out.iterdir():
        if path.is_dir() and re.fullmatch(r"layer\d+", path.name):
            shutil.rmtree(path)
        elif path.is_file() and (path.name in ("extract.json", "index.tsv") or path.name.endswith(".partial")
                                 or re.fullmatch(r"features-\d+\.(tar|safetensors)", path.name)):
            path.unlink()


def check_arguments(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first argument that cannot work, before the model is loaded."""
    for name in args.inputs:
        if not Path(name).exists():
            raise ValueError(f"input {name} does not exist")
    for flag, value in (("--batch-seconds", args.batch_seconds), ("--max-seconds", args.max_seconds),
                        ("--window-seconds", args.window_seconds)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be a positive number of seconds, got {value}")
    if not (math.isfinite(args.overlap_seconds) and 0 <= args.overlap_seconds < args.window_seconds):
        raise ValueError(f"--overlap-seconds must be at least 0 and less than --window-seconds "
                         f"({args.window_seconds}), got {args.overlap_seconds}")
    if args.per_file < 1:
        raise ValueError(f"--per-file must be at least 1, got {args.per_file}")
    if args.workers < 0:
        raise ValueError(f"--workers must be 0 or more, got {args.workers}")


def window_samples(features: LayerFeatures, window_seconds: float, overlap_seconds: float) -> tuple[int, int]:
    """The window and overlap in samples, rounded down to whole frames; ValueError (in the flags'
    terms) when the model cannot stitch windows of that size (see
    :meth:`LayerFeatures.window_plan`)."""
    stride, field = features.stride, min_input_samples(features.model)
    window = int(window_seconds * SAMPLE_RATE) // stride * stride
    overlap = int(overlap_seconds * SAMPLE_RATE) // stride * stride
    if not 2 * field <= overlap < window:
        raise ValueError(f"--window-seconds {window_seconds} and --overlap-seconds {overlap_seconds}, in whole "
                         f"frames of {stride} samples: {window / SAMPLE_RATE:g} s and {overlap / SAMPLE_RATE:g} s; "
                         f"this model needs {2 * field / SAMPLE_RATE:g} s <= overlap < window")
    return window, overlap


def run(args: argparse.Namespace) -> int:
    """Extract as the parsed arguments of ``speechssl extract`` say; the exit status."""
    try:
        check_arguments(args)
        model, normalize = load_encoder(args.model)
        features = LayerFeatures(model, args.layers)
        window, overlap = window_samples(features, args.window_seconds, args.overlap_seconds)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    normalize = normalize or args.normalize
    out = Path(args.output)
    settings = {"model": args.model if args.model.startswith("hf:") else str(Path(args.model).resolve()),
                "inputs": [str(Path(name).resolve()) for name in args.inputs], "layers": features.layers,
                "format": args.format, "save_dtype": args.save_dtype, "normalize": normalize}
    lock = FolderLock(out, "extract")
    try:
        lock.acquire()
        if args.overwrite:
            clear_outputs(out)
        check_settings(out, settings)
    except (FolderLocked, ValueError) as err:
        lock.release()
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = extract(args, features, out, normalize, window, overlap)
    finally:
        lock.release()
    print(json.dumps(summary))
    return 0


def extract(args: argparse.Namespace, features: LayerFeatures, out: Path, normalize: bool, window: int,
            overlap: int) -> dict:
    """Write the features of every utterance of ``args.inputs`` not yet in ``out``; the summary."""
    model = features.model
    device = pick_device(args.device)
    features.to(device)
    model.extract_per_utterance = True  # features that do not depend on what they were batched with
    writer = {"npy": lambda: NpyWriter(out, features.layers),
              "shards": lambda: ShardWriter(out, features.layers, args.per_file),
              "safetensors": lambda: SafetensorsWriter(out, features.layers, args.per_file)}[args.format]()
    autocast = torch.autocast(device.type, dtype={"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype),
                              enabled=args.dtype != "fp32")
    save_dtype = np.dtype(args.save_dtype)
    skipped, counts = Counter(), Counter()
    from tqdm import tqdm

    bar = tqdm(unit="utt", disable=args.quiet, dynamic_ncols=True)

    def todo():
        seen: set[str] = set()
        for utt in read_utterances(args.inputs, skipped, args.workers, min_samples=min_input_samples(model)):
            if any(c in utt.id for c in "\t\n\r"):
                skip(skipped, repr(utt.id), "bad_id", "bad_id: a tab or line break in the id")
                continue
            if utt.id in seen:
                skip(skipped, utt.id, "duplicate_id", "duplicate_id: an earlier utterance has this id "
                     "(its features are kept)")
                continue
            seen.add(utt.id)
            if utt.id in writer.done:
                counts["already written"] += 1
                bar.update(1)
                continue
            if normalize:
                utt.audio = normalize_audio(utt.audio)
            yield utt

    def save(utt: Utterance, states: list[torch.Tensor]) -> None:
        writer.write(utt, [s.float().cpu().numpy().astype(save_dtype) for s in states])
        counts["written"] += 1
        counts["audio_seconds"] += len(utt.audio) / SAMPLE_RATE
        bar.update(1)

    def unwindowed():
        """Utterances for batching; a long one is windowed and saved on the way."""
        for utt in todo():
            if len(utt.audio) <= args.max_seconds * SAMPLE_RATE:
                yield utt
                continue
            with autocast:
                result = features.windowed(torch.from_numpy(utt.audio).to(device), window, overlap)
            save(utt, [s[0] for s in result.hidden_states])
            counts["windowed"] += 1

    start = time.perf_counter()
    try:
        for batch in batches(unwindowed(), args.batch_seconds):
            waves, lengths = pad_waveforms([u.audio for u in batch])
            with autocast:
                result = features(waves.to(device), lengths)
            for i, utt in enumerate(batch):
                save(utt, [s[i, : int(result.lengths[i])] for s in result.hidden_states])
    finally:
        writer.close()
        bar.close()
    seconds = time.perf_counter() - start  # reading, computing and writing; not the model's loading
    audio = counts.pop("audio_seconds", 0.0)
    return {"output": str(out), "format": args.format, "layers": features.layers, **counts,
            "skipped": dict(skipped), "audio_seconds": round(audio, 1), "seconds": round(seconds, 2),
            "audio_seconds_per_second": round(audio / max(seconds, 1e-9), 1),
            "real_time_factor": round(seconds / audio, 5) if audio else None}

