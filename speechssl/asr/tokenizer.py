"""Tokenizers for CTC, with the blank at index 0.

Characters: the characters of the training transcripts, ``|`` between words (fairseq's letter
targets, Hugging Face's ``Wav2Vec2CTCTokenizer`` layout).

    tokenizer = CharTokenizer.build(transcripts)        # vocab: <blank>, <unk>, |, then the characters
    ids = tokenizer.encode("HELLO WORLD")               # [.., 2 (|), ..]
    tokenizer.decode(ids) == "HELLO WORLD"

SentencePiece BPE: subword pieces trained on the training transcripts (or an existing model),
id ``i + 1`` for the model's piece ``i``; the model itself travels in ``to_dict()``, so a saved
CTC model needs no side file.

    tokenizer = BpeTokenizer.train(transcripts, vocab_size=256)

Text is normalised before encoding (``case``: ``upper``, ``lower`` or ``keep``; runs of whitespace
become one word boundary). Characters not in the vocabulary map to ``<unk>`` and are counted in
``unknown``.
"""

from __future__ import annotations

import base64
import io
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

BLANK, UNK, WORD = "<blank>", "<unk>", "|"


def fold_case(text: str, case: str) -> str:
    return text.upper() if case == "upper" else text.lower() if case == "lower" else text


@dataclass
class CharTokenizer:
    vocab: list[str]
    case: str = "upper"
    unknown: Counter = field(default_factory=Counter, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.vocab[:3] != [BLANK, UNK, WORD]:
            raise ValueError(f"a character vocabulary starts with {BLANK}, {UNK}, {WORD}; got {self.vocab[:3]}")
        if self.case not in ("upper", "lower", "keep"):
            raise ValueError(f"case must be upper, lower or keep, got {self.case!r}")
        self.index = {token: i for i, token in enumerate(self.vocab)}

    blank = 0

    @classmethod
    def build(cls, transcripts: Iterable[str], case: str = "upper") -> CharTokenizer:
        """The vocabulary of ``transcripts``: the special tokens, then their characters sorted."""
        probe = cls([BLANK, UNK, WORD], case)
        chars = {c for text in transcripts for c in probe.normalize(text) if c != WORD}
        if not chars:
            raise ValueError("no characters in the transcripts: is the text field empty?")
        return cls([BLANK, UNK, WORD, *sorted(chars)], case)

    def normalize(self, text: str) -> str:
        """Case folded, words joined by ``|``: ``" Hello  world "`` -> ``"HELLO|WORLD"``."""
        return WORD.join(fold_case(text, self.case).replace(WORD, " ").split())

    def encode(self, text: str) -> list[int]:
        ids = []
        for c in self.normalize(text):
            i = self.index.get(c)
            if i is None:
                self.unknown[c] += 1
                i = 1
            ids.append(i)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids (blanks and CTC repeats already removed) to text, ``|`` back to spaces."""
        return " ".join(word for word in "".join(self.vocab[i] for i in ids if i > 0).split(WORD) if word)

    def __len__(self) -> int:
        return len(self.vocab)

    def to_dict(self) -> dict:
        return {"type": "char", "vocab": self.vocab, "case": self.case}

    @classmethod
    def from_dict(cls, data: dict) -> CharTokenizer:
        if data.get("type") != "char":
            raise ValueError(f"not a character tokenizer: type {data.get('type')!r}")
        return cls(list(data["vocab"]), data.get("case", "upper"))


@dataclass
class BpeTokenizer:
    """SentencePiece pieces after the CTC blank: id 0 is the blank, id ``i + 1`` the model's piece
    ``i``. ``model``: the serialised SentencePiece model."""

    model: bytes
    case: str = "upper"
    unknown: Counter = field(default_factory=Counter, compare=False, repr=False)

    blank = 0

    def __post_init__(self) -> None:
        import sentencepiece

        if self.case not in ("upper", "lower", "keep"):
            raise ValueError(f"case must be upper, lower or keep, got {self.case!r}")
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=self.model)
        self.vocab = [BLANK, *(self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size()))]

    @classmethod
    def train(cls, transcripts: Iterable[str], vocab_size: int, case: str = "upper") -> BpeTokenizer:
        """A BPE model of at most ``vocab_size`` pieces (fewer when the transcripts cannot fill it),
        covering every character of the transcripts; no BOS, EOS or padding pieces."""
        import sentencepiece

        texts = [" ".join(fold_case(t, case).split()) for t in transcripts]
        texts = [t for t in texts if t]
        if not texts:
            raise ValueError("no text in the transcripts: is the text field empty?")
        model = io.BytesIO()
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            hard_vocab_limit=False, character_coverage=1.0, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
            num_threads=1, minloglevel=2)
        return cls(model.getvalue(), case)

    @classmethod
    def load(cls, path: str, case: str = "upper") -> BpeTokenizer:
        """An existing SentencePiece model file (``.model``)."""
        with open(path, "rb") as f:
            return cls(f.read(), case)

    def encode(self, text: str) -> list[int]:
        text = " ".join(fold_case(text, self.case).split())
        ids = [i + 1 for i in self.sp.encode(text)]
        if self.sp.unk_id() + 1 in ids:
            self.unknown.update(c for c in text if c != " " and self.sp.piece_to_id(c) == self.sp.unk_id())
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids (blanks and CTC repeats already removed) to text; ``<unk>`` as the character
        tokenizer writes it."""
        text = self.sp.decode([i - 1 for i in ids if i > 0]).replace("\u2047", UNK)
        return " ".join(text.split())

    def __len__(self) -> int:
        return len(self.vocab)

    def to_dict(self) -> dict:
        return {"type": "bpe", "model": base64.b64encode(self.model).decode("ascii"), "case": self.case}

    @classmethod
    def from_dict(cls, data: dict) -> BpeTokenizer:
        if data.get("type") != "bpe":
            raise ValueError(f"not a BPE tokenizer: type {data.get('type')!r}")
        return cls(base64.b64decode(data["model"]), data.get("case", "upper"))


Tokenizer = CharTokenizer | BpeTokenizer


def tokenizer_from_dict(data: dict) -> Tokenizer:
    """The tokenizer saved with a CTC model (``to_dict()`` of either kind)."""
    kinds = {"char": CharTokenizer, "bpe": BpeTokenizer}
    if data.get("type") not in kinds:
        raise ValueError(f"unknown tokenizer type {data.get('type')!r} (char or bpe)")
    return kinds[data["type"]].from_dict(data)
