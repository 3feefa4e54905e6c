"""lhotse CutSet manifests (``cuts.jsonl.gz`` or ``cuts.jsonl``), read as JSON: lhotse is not needed.

Each line is a cut as lhotse writes it (``MonoCut.to_dict()``). A cut is ``duration`` seconds of
its ``recording`` from ``start`` (seconds), on one ``channel``: the entry is that slice of the file
whose source holds the channel, cut at the file's own rate before any resampling. Its
``supervisions`` (times relative to the cut) give the transcript, their texts joined by spaces in
start order, and the speaker when all that name one agree; they are kept as they are in the
sample's metadata, with the recording id.

What lhotse would make of a cut beyond a plain file slice is not reproduced: MultiCut, MixedCut and
PaddingCut, a recording with ``transforms`` (speed, volume, resampling), a source other than a
file (``url``, ``command``, ``memory``, ``shar``), a cut with features and no recording. Such a cut
becomes an entry with a problem: it is skipped, and reported, with reason ``unsupported_cut``.
Relative source paths are relative to the working directory, as lhotse reads them.
"""

from __future__ import annotations

from pathlib import Path

from speechssl.data.entry import Entry, parse_seconds

MONO_CUTS = ("MonoCut", "Cut")  # "Cut": MonoCut's name before lhotse 0.8
CUT_TYPES = (*MONO_CUTS, "MultiCut", "MixedCut", "PaddingCut")
UNSUPPORTED = "unsupported_cut"


def is_cut(row: dict) -> bool:
    """Whether a JSON row is a lhotse cut: a cut ``type``, or supervisions with a recording or features."""
    return row.get("type") in CUT_TYPES or ("supervisions" in row and ("recording" in row or "features" in row))


def read_cuts(rows: list[dict], where: str) -> list[Entry]:
    """One entry per cut of a CutSet's rows (``where``: the manifest, for errors)."""
    entries = []
    for n, row in enumerate(rows, 1):
        cut_id = str(row.get("id") or f"cut-{n}")
        entries.append(_entry(row, cut_id, f"{where}: cut {cut_id}"))
    return entries


def _entry(cut: dict, cut_id: str, where: str) -> Entry:
    recording = cut.get("recording") or {}
    supervisions = sorted(cut.get("supervisions") or [], key=lambda s: s.get("start", 0.0))
    texts = [s["text"].strip() for s in supervisions if isinstance(s.get("text"), str) and s["text"].strip()]
    speakers = {str(s["speaker"]) for s in supervisions if s.get("speaker") is not None}
    entry = Entry(id=cut_id, path="", text=" ".join(texts) or None,
                  speaker=speakers.pop() if len(speakers) == 1 else None,
                  extra={"recording_id": recording.get("id"), "supervisions": supervisions,
                         **({"custom": cut["custom"]} if cut.get("custom") else {})})

    def unsupported(detail: str) -> Entry:
        entry.problem = (UNSUPPORTED, f"{where}: {detail}")
        return entry

    kind = cut.get("type", "MonoCut")
    if kind not in MONO_CUTS:
        return unsupported(f"a {kind}; only MonoCuts (one channel of one recording) are read")
    if not recording:
        return unsupported("no recording" + (" (features only)" if cut.get("features") else ""))
    if recording.get("transforms"):
        names = ", ".join(str(t.get("name", t)) for t in recording["transforms"])
        return unsupported(f"recording transforms ({names}) are not applied here; shard the original audio")
    channel = cut.get("channel", 0)
    if isinstance(channel, list):  # a MonoCut's channel may be written as a one-element list
        if len(channel) != 1:
            return unsupported(f"channels {channel}; only one channel is read")
        channel = channel[0]
    source = next((s for s in recording.get("sources") or [] if channel in s.get("channels", [])), None)
    if source is None:
        return unsupported(f"no source of recording {recording.get('id')} has channel {channel}")
    if source.get("type") != "file":
        return unsupported(f"a {source.get('type')!r} audio source; only files are read")
    entry.path = str(Path(source["source"]).resolve())
    entry.offset = parse_seconds(cut.get("start", 0.0), f"{where}, start")
    entry.duration = parse_seconds(cut["duration"], f"{where}, duration") if "duration" in cut else None
    entry.channel = source["channels"].index(channel)  # the channel's place in its file
    return entry
