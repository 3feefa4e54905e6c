"""CTC beam search with a lexicon and a word n-gram LM (torchaudio's ``ctc_decoder``, which runs
flashlight-text's decoder with KenLM).

    lm = LanguageModel.load("runs/lm")            # lm.arpa, lexicon.txt, decoding.json (tuned weights)
    decoder = BeamDecoder(tokenizer, lm, DecoderSettings(beam=50, lm_weight=1.0, word_score=0.5))
    texts = decoder(log_probs, frames)            # (B, T, V) float32 on the CPU, (B,) -> list[str]

Without an LM, ``BeamDecoder(tokenizer)`` is a lexicon-free beam search over the model's tokens. With
one, hypotheses are sequences of lexicon words scored by ``log p_ctc + lm_weight * log p_lm +
word_score * words``. The lexicon spells each word in the model's tokens: ``build-lm`` writes one
for character models; for any other model, or a word list without spellings, it is spelled with
the model's own tokenizer here.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from speechssl.asr.decoding import Hypothesis, penalize_blank
from speechssl.asr.tokenizer import BLANK, WORD, CharTokenizer, Tokenizer

log = logging.getLogger("speechssl.decode")

ARPA, LEXICON, SETTINGS = "lm.arpa", "lexicon.txt", "decoding.json"


@dataclass
class DecoderSettings:
    """beam: hypotheses kept per frame (torchaudio ``beam_size``); beam_threshold: score margin
    below the best at which hypotheses are pruned; lm_weight and word_score: the LM's weight and
    a bonus per word (fairseq's ``lm_weight``/``word_score``, torchaudio's names); unk_score: the
    score of a word outside the lexicon (-inf: never); blank_penalty: subtracted from the blank's
    log-probability before the search (icefall's ``blank_penalty``; above 0, fewer deletions)."""

    beam: int = 50
    beam_threshold: float = 50.0
    lm_weight: float = 2.0
    word_score: float = 0.0
    unk_score: float = float("-inf")
    blank_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.beam < 1:
            raise ValueError(f"beam must be >= 1, got {self.beam}")


@dataclass
class LanguageModel:
    """An ARPA file and the lexicon (word -> spelling in tokens, or None: spell it with the model's
    tokenizer); ``settings``: the decoding settings tuned for it (``decoding.json``), if any."""

    arpa: Path
    lexicon: dict[str, list[str] | None]
    settings: dict | None = None

    @classmethod
    def load(cls, path: str | Path, lexicon: str | Path | None = None) -> LanguageModel:
        """``path``: a folder written by ``build-lm`` (lm.arpa, lexicon.txt, decoding.json if
        tuned) or an ARPA file (its words, spelled by the model's tokenizer, unless ``lexicon``)."""
        path = Path(path)
        folder = path if path.is_dir() else None
        arpa = path / ARPA if folder else path
        if not arpa.is_file():
            raise FileNotFoundError(f"{arpa}: no ARPA language model there")
        if lexicon is None and folder is not None and (folder / LEXICON).is_file():
            lexicon = folder / LEXICON
        words = read_lexicon(lexicon) if lexicon else dict.fromkeys(arpa_words(arpa))
        settings = None
        if folder is not None and (folder / SETTINGS).is_file():
            settings = json.loads((folder / SETTINGS).read_text())
        return cls(arpa, words, settings)


def arpa_words(path: Path) -> list[str]:
    """The unigrams of an ARPA file, without ``<s>``, ``</s>`` and ``<unk>``."""
    words, inside = [], False
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line.startswith("\\"):
                inside = line == "\\1-grams:"
                continue
            if inside and line:
                word = line.split()[1]
                if word not in ("<s>", "</s>", "<unk>"):
                    words.append(word)
    return words


def read_lexicon(path: str | Path) -> dict[str, list[str] | None]:
    """``WORD<TAB>t1 t2 ...`` per line (flashlight's format); a line with a word alone is spelled
    by the model's tokenizer."""
    out: dict[str, list[str] | None] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) == 1 and "\t" in line.rstrip("\n"):
                raise ValueError(f"{path}:{number}: a word with an empty spelling")
            out[parts[0]] = parts[1:] or None
    return out


def spell(word: str, tokenizer: Tokenizer) -> list[str]:
    """A word in the model's tokens, ending with the word boundary for character models."""
    return [tokenizer.vocab[i] for i in tokenizer.encode(word)] + ([WORD] if isinstance(tokenizer, CharTokenizer)
                                                                    else [])


def write_lexicon(spellings: dict[str, list[str]], path: str | Path) -> None:
    """``WORD<TAB>t1 t2 ...`` per line, as :func:`read_lexicon` and flashlight read it."""
    with open(path, "w", encoding="utf-8") as f:
        for word, spelling in spellings.items():
            f.write(f"{word}\t{' '.join(spelling)}\n")


def model_spellings(lm: LanguageModel, tokenizer: Tokenizer) -> dict[str, list[str]]:
    """The LM's lexicon in the model's tokens. A spelling in tokens the model lacks (a character
    lexicon for a BPE model) is replaced by the model's own; words the model cannot spell at all
    are left out, with a warning."""
    known = set(tokenizer.vocab)

    def usable(spelling: list[str] | None) -> bool:
        return bool(spelling) and set(spelling) <= known and tokenizer.vocab[1] not in spelling

    spellings, dropped = {}, []
    for word, spelling in lm.lexicon.items():
        spelling = spelling if usable(spelling) else spell(word, tokenizer)
        if usable(spelling):
            spellings[word] = spelling
        else:
            dropped.append(word)
    if dropped:
        log.warning("%d lexicon word(s) use tokens the model does not have and cannot be decoded: %s",
                    len(dropped), " ".join(dropped[:20]) + (" ..." if len(dropped) > 20 else ""))
    if not spellings:
        raise ValueError("no lexicon word can be spelled with the model's tokens")
    return spellings


class BeamDecoder:
    """``decoder(log_probs (B, T, V), frames (B,))`` -> transcripts. ``lm``: None for a
    lexicon-free beam search without LM."""

    def __init__(self, tokenizer: Tokenizer, lm: LanguageModel | None = None,
                 settings: DecoderSettings | None = None):
        try:
            from torchaudio.models.decoder import ctc_decoder
        except (ImportError, RuntimeError) as e:  # flashlight-text missing
            raise RuntimeError(f"beam search needs the flashlight-text package: {e}") from None
        self.tokenizer, self.settings = tokenizer, settings or DecoderSettings()
        tokens = list(tokenizer.vocab)
        if tokens[tokenizer.blank] != BLANK:
            raise ValueError(f"the tokenizer's blank is {tokens[tokenizer.blank]!r}, not {BLANK}")
        # flashlight needs a word-boundary ("silence") token; BPE vocabularies mark words inside
        # their pieces, so the blank stands in for it there.
        sil = WORD if WORD in tokens else BLANK
        s = self.settings
        options = dict(tokens=tokens, nbest=1, beam_size=s.beam, beam_threshold=s.beam_threshold,
                       word_score=s.word_score, unk_score=s.unk_score, sil_score=0.0, blank_token=BLANK,
                       sil_token=sil, unk_word="<unk>")
        self.uses_lexicon = lm is not None
        if lm is None:
            self.decoder = ctc_decoder(lexicon=None, lm=None, lm_weight=0.0, **options)
            return
        # flashlight reads the lexicon file while the decoder is built; the file is not kept
        with tempfile.TemporaryDirectory(prefix="speechssl-lexicon-") as folder:
            lexicon = Path(folder) / "lexicon.txt"
            write_lexicon(model_spellings(lm, tokenizer), lexicon)
            self.decoder = ctc_decoder(lexicon=str(lexicon), lm=str(lm.arpa), lm_weight=s.lm_weight, **options)

    def hypotheses(self, log_probs: Tensor, frames: Tensor | None) -> list[Hypothesis]:
        """The best hypothesis of each row, with its tokens and the frame where each starts
        (flashlight's timesteps)."""
        emissions = penalize_blank(log_probs.detach().float().cpu(), self.tokenizer.blank,
                                   self.settings.blank_penalty).contiguous()
        lengths = None if frames is None else frames.detach().cpu().to(torch.int32)
        out = []
        valid = [emissions.shape[1]] * emissions.shape[0] if lengths is None else lengths.tolist()
        for hypotheses, n in zip(self.decoder(emissions, lengths), valid, strict=True):
            if not hypotheses:
                out.append(Hypothesis("", [], []))
                continue
            best = hypotheses[0]
            # torchaudio has merged repeats and removed blanks (the sil token may be the blank).
            # flashlight's path has a sil step before the first frame and after the last, so
            # timestep i is frame i - 1, and those two are not frames.
            kept = [(int(t), int(f) - 1) for t, f in zip(best.tokens, best.timesteps, strict=True)
                    if int(t) != self.tokenizer.blank and 0 < int(f) <= n]
            tokens, starts = [t for t, _ in kept], [f for _, f in kept]
            text = " ".join(w for w in best.words if w) if self.uses_lexicon else self.tokenizer.decode(tokens)
            out.append(Hypothesis(text, tokens, starts))
        return out

    def __call__(self, log_probs: Tensor, frames: Tensor | None) -> list[str]:
        return [h.text for h in self.hypotheses(log_probs, frames)]

    def to_dict(self) -> dict:
        return asdict(self.settings)
