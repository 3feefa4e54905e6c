from __future__ import annotations

import itertools

import torch

from speechssl.models.masker import Masker, MaskingConfig, compute_channel_mask, compute_span_mask


def _runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each run of True."""
    runs, start = [], None
    for i, v in enumerate([*row.tolist(), False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def test_spans_stay_inside_valid_lengths_with_equal_counts() -> None:
    lengths = torch.tensor([200, 150, 97, 31, 200, 64])
    for _ in range(20):
        mask = compute_span_mask((6, 200), 0.65, 10, 2, lengths)
        assert not mask[torch.arange(200) >= lengths[:, None]].any()
        counts = mask.sum(1)
        assert torch.all(counts == counts[0]) and counts[0] > 0


def test_masked_fraction_matches_fairseq() -> None:
    # Overlapping spans of 10 from int(0.065 * T + U) starts cover about 1 - (1 - 0.065)^10 = 49%.
    mask = compute_span_mask((400, 500), 0.65, 10, 2, require_same_masks=False)
    fraction = mask.float().mean().item()
    assert 0.46 < fraction < 0.52, fraction
    same = compute_span_mask((8, 500), 0.65, 10, 2)
    assert 0.38 < same.float().mean().item() < 0.52


def test_spans_are_whole_and_min_masks_hold() -> None:
    mask = compute_span_mask((50, 300), 0.3, 10, 2, require_same_masks=False)
    for row in mask:
        assert all(length >= 10 for _, length in _runs(row))
    short = compute_span_mask((20, 40), 0.01, 5, min_masks=2, require_same_masks=False)
    assert (short.sum(1) >= 5).all()  # min_masks spans even when mask_prob asks for none


def test_no_overlap_keeps_min_space() -> None:
    mask = compute_span_mask((50, 300), 0.65, 10, 2, require_same_masks=False, no_overlap=True, min_space=3)
    for row in mask:
        runs = _runs(row)
        assert runs and all(length == 10 for _, length in runs)
        gaps = [b[0] - (a[0] + a[1]) for a, b in itertools.pairwise(runs)]
        assert all(g >= 3 for g in gaps)


def test_mask_dropout_unmasks_a_fraction() -> None:
    torch.manual_seed(3)
    full = compute_span_mask((4, 300), 0.65, 10, 2)
    torch.manual_seed(3)
    dropped = compute_span_mask((4, 300), 0.65, 10, 2, mask_dropout=0.2)
    n = full.sum(1)
    assert torch.equal(dropped.sum(1), n - torch.round(n * 0.2).long())
    assert not (dropped & ~full).any()


def test_masks_differ_between_rows_and_calls() -> None:
    a = compute_span_mask((4, 300), 0.65, 10, 2)
    b = compute_span_mask((4, 300), 0.65, 10, 2)
    assert not torch.equal(a, b) and not torch.equal(a[0], a[1])


def test_channel_mask() -> None:
    mask = compute_channel_mask(8, 256, 0.5, 16)
    assert mask.shape == (8, 256) and mask.any()
    assert (mask.sum(1) == mask.sum(1)[0]).all()


def test_mask_prob_zero_masks_nothing_and_a_frame_stays_visible() -> None:
    assert not compute_span_mask((4, 100), 0.0, 10, 2).any()
    short = compute_span_mask((64, 12), 0.65, 10, 2, torch.full((64,), 12), require_same_masks=False)
    assert (short.sum(1) <= 11).all() and short.any()


def test_the_masker_draws_what_its_config_asks_and_applies_it() -> None:
    masker = Masker(MaskingConfig(mask_prob=0.5, mask_length=4, channel_prob=0.5, channel_length=3), dim=16)
    time, channel = masker.draw(torch.tensor([40, 30]), (2, 40), torch.device("cpu"), require_same_masks=False)
    assert time.shape == (2, 40) and channel.shape == (2, 16) and time.any() and channel.any()
    assert not time[1, 30:].any()  # padding is never masked
    x = torch.randn(2, 40, 16)
    y = masker(x, time, channel)
    kept = ~time.unsqueeze(-1) & ~channel.unsqueeze(1)
    assert torch.equal(y[kept], x[kept])
    assert (y.masked_select(channel.unsqueeze(1).expand_as(y)) == 0).all()
    emb_rows = time.unsqueeze(-1) & ~channel.unsqueeze(1)
    assert torch.equal(y[emb_rows], masker.mask_emb.detach().expand_as(y)[emb_rows])
    off = Masker(MaskingConfig(mask_prob=0.0, channel_prob=0.0), dim=16)
    assert off.draw(None, (2, 40), torch.device("cpu")) == (None, None)
    assert torch.equal(off(x), x)


def test_model_files_from_before_the_masker_module_still_load(tmp_path) -> None:
    """Files written when the mask embedding was ``frontend.mask_emb`` load into ``frontend.masker``."""
    from speechssl import Wav2Vec2Model, load_model, load_model_config

    model = Wav2Vec2Model(load_model_config("configs/model/tiny_transformer.yaml"))
    model.save(tmp_path / "new.pt")
    blob = torch.load(tmp_path / "new.pt", weights_only=True)
    blob["state_dict"]["frontend.mask_emb"] = blob["state_dict"].pop("frontend.masker.mask_emb")
    torch.save(blob, tmp_path / "old.pt")
    assert torch.equal(load_model(tmp_path / "old.pt").frontend.masker.mask_emb, model.frontend.masker.mask_emb)
