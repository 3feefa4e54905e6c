"""CTC fine-tuning: the tokenizer and the freezing schedules."""

from __future__ import annotations

import pytest

from finetune.tokenizer import CharTokenizer
from speechssl.config import ConfigError
from speechssl.training.freezing import check_schedule, frozen_modules, is_frozen


def test_tokenizer_round_trips_and_counts_unknown_characters() -> None:
    tokenizer = CharTokenizer.build(["hello world", "  the  END "])
    assert tokenizer.vocab[:3] == ["<blank>", "<unk>", "|"] and tokenizer.blank == 0
    assert tokenizer.vocab[3:] == sorted(set("HELLOWORLDTHEEND"))
    ids = tokenizer.encode("  Hello   the world ")
    assert ids.count(2) == 2 and 0 not in ids  # two word boundaries, never the blank
    assert tokenizer.decode(ids) == "HELLO THE WORLD"
    assert tokenizer.decode(tokenizer.encode("HELLO Q")) == "HELLO <unk>"
    assert tokenizer.unknown == {"Q": 1}
    again = CharTokenizer.from_dict(tokenizer.to_dict())
    assert again.vocab == tokenizer.vocab and again.encode("the end") == tokenizer.encode("THE END")
    lower = CharTokenizer.build(["Hello"], case="lower")
    assert lower.decode(lower.encode("HELLO")) == "hello"
    with pytest.raises(ValueError, match="no characters"):
        CharTokenizer.build(["", "  "])


@pytest.mark.parametrize("spec,frozen_at", [
    (-1, {0, 1, 2, 3, 4, 5, 6, 10**6}),
    (3, {0, 1, 2}),
    ([2, 4], {2, 3, 4}),
    ([5, -1], {5, 6, 10**6}),
])
def test_freeze_schedule_forms(spec, frozen_at: set[int]) -> None:
    for update in [0, 1, 2, 3, 4, 5, 6, 10**6]:
        assert is_frozen(spec, update) == (update in frozen_at), (spec, update)


def test_freeze_schedule_checks() -> None:
    schedule = check_schedule({"feature_extractor": -1, "context": 2})
    assert frozen_modules(schedule, 0) == {"feature_extractor", "context"}
    assert frozen_modules(schedule, 2) == {"feature_extractor"}
    for bad, words in [({"encoder": 2}, "freeze_updates.encoder: unknown module"),
                       ({"context": -2}, "must be -1"), ({"context": [5, 2]}, "0 <= a <= b"),
                       ({"context": [1, 2, 3]}, "must be -1, N or \\[a, b\\]")]:
        with pytest.raises(ConfigError, match=words):
            check_schedule(bad)
