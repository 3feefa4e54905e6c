"""speechssl.load on every kind of source, and starting pretraining from a model (init=)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import speechssl
from speechssl import Wav2Vec2Model, load_model_config
from speechssl.models.ctc import CTCModel
from speechssl.models.loading import take_weights
from tests.conftest import REPO

TINY = REPO / "configs/model/tiny_transformer.yaml"


def _waves() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    return torch.randn(2, 8000), torch.tensor([8000, 6400])


def _features(model) -> torch.Tensor:
    waves, lengths = _waves()
    with torch.no_grad():
        return model.encode(waves, lengths)[0] if isinstance(model, Wav2Vec2Model) else model(waves, lengths)[0]


@pytest.fixture
def pretrained(tmp_path: Path) -> Wav2Vec2Model:
    torch.manual_seed(11)
    return Wav2Vec2Model(load_model_config(TINY)).eval()


def test_load_reads_model_files_run_folders_and_ctc_models(pretrained: Wav2Vec2Model, tmp_path: Path) -> None:
    pretrained.save(tmp_path / "pre.pt")
    (tmp_path / "run").mkdir()
    pretrained.save(tmp_path / "run" / "model.pt")
    for source in (tmp_path / "pre.pt", tmp_path / "run", str(tmp_path / "run")):
        loaded = speechssl.load(source)
        assert type(loaded) is Wav2Vec2Model and not loaded.training
        torch.testing.assert_close(_features(loaded), _features(pretrained), rtol=0, atol=0)
    ctc = CTCModel.from_pretrained(pretrained, 7, vocab=[f"t{i}" for i in range(7)])
    ctc.save(tmp_path / "ctc.pt")
    loaded = speechssl.load(tmp_path / "ctc.pt")
    assert type(loaded) is CTCModel and loaded.vocab == ctc.vocab
    torch.testing.assert_close(_features(loaded), _features(ctc.eval()), rtol=0, atol=0)


def test_load_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        speechssl.load(tmp_path / "nothing.pt")
    (tmp_path / "stopped" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="speechssl export"):
        speechssl.load(tmp_path / "stopped")
    with pytest.raises(ValueError, match="not a torchaudio wav2vec 2"):
        speechssl.load("ta:NO_SUCH_BUNDLE")


def test_load_reads_hugging_face_folders(pretrained: Wav2Vec2Model, tmp_path: Path) -> None:
    from speechssl.interop.huggingface import to_huggingface

    to_huggingface(pretrained, "pretraining").save_pretrained(tmp_path / "hf")
    for source in (tmp_path / "hf", f"hf:{tmp_path / 'hf'}"):
        loaded = speechssl.load(source)
        assert type(loaded) is Wav2Vec2Model
        torch.testing.assert_close(_features(loaded), _features(pretrained), rtol=0, atol=1e-6)
        # the pretraining parts came along too
        torch.testing.assert_close(loaded.quantizer.codevectors, pretrained.quantizer.codevectors, rtol=0, atol=0)


def _bundle_weights(hub: Path, name: str, ta_model: torch.nn.Module) -> None:
    (hub / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(ta_model.state_dict(), hub / "checkpoints" / name)


def test_load_reads_torchaudio_bundles_from_the_hub_cache(pretrained: Wav2Vec2Model, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A bundle as torchaudio defines one (tiny, so that its weights can be written to torch.hub's
    cache here, where its get_model finds them without the network)."""
    import torchaudio.pipelines
    from torchaudio.models import wav2vec2_model
    from torchaudio.pipelines._wav2vec2.impl import Wav2Vec2ASRBundle, Wav2Vec2Bundle

    from speechssl.interop.torchaudio import to_torchaudio, torchaudio_kwargs

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    params = {**torchaudio_kwargs(pretrained.config), "aux_num_out": None}
    ta_base = to_torchaudio(pretrained)
    _bundle_weights(tmp_path / "hub", "tiny_base.pth", ta_base)
    monkeypatch.setattr(torchaudio.pipelines, "TINY_BASE", Wav2Vec2Bundle("tiny_base.pth", params, 16000, False,
                                                                          "Wav2Vec2"), raising=False)
    loaded = speechssl.load("ta:TINY_BASE")
    assert type(loaded) is Wav2Vec2Model
    with torch.no_grad():
        waves, lengths = _waves()
        ours, frames = loaded.encode(waves, lengths)
        theirs, ta_frames = ta_base.eval()(waves, lengths)
    n = int(frames[1])
    torch.testing.assert_close(ours[1, :n], theirs[1, :n], rtol=0, atol=1e-5)

    labels = ("-", "|", "A", "B", "C")  # get_labels(): the blank first, | between words
    torch.manual_seed(5)
    ta_asr = wav2vec2_model(**{**params, "aux_num_out": len(labels)}).eval()
    _bundle_weights(tmp_path / "hub", "tiny_asr.pth", ta_asr)
    monkeypatch.setattr(torchaudio.pipelines, "TINY_ASR", Wav2Vec2ASRBundle(
        "tiny_asr.pth", {**params, "aux_num_out": len(labels)}, 16000, False, "Wav2Vec2", labels[1:], None),
        raising=False)
    ctc = speechssl.load("ta:TINY_ASR")
    assert type(ctc) is CTCModel and ctc.tokenizer is not None
    with torch.no_grad():
        ta_logits, _ = ta_asr(waves, lengths)
        logits, _ = ctc(waves, lengths)
    # the same greedy transcripts: our vocabulary holds the bundle's labels (reordered)
    ours_text = ["".join(ctc.vocab[i] for i in torch.unique_consecutive(row[:n].argmax(-1)) if i != ctc.blank)
                 for row, n in zip(logits, frames.tolist(), strict=True)]
    theirs_text = ["".join(labels[i] for i in torch.unique_consecutive(row[:n].argmax(-1)) if i != 0)
                   for row, n in zip(ta_logits, ta_frames.tolist(), strict=True)]
    assert ours_text == theirs_text


def test_take_weights_lists_what_starts_fresh_and_refuses_another_architecture(pretrained: Wav2Vec2Model) -> None:
    torch.manual_seed(1)
    model = Wav2Vec2Model(load_model_config(TINY))
    ctc = CTCModel.from_pretrained(pretrained, 5)
    done = take_weights(model, ctc)
    assert "quantizer" in done.fresh and "project_q" in done.fresh and "final_proj" in done.fresh
    assert done.unused == ["lm_head"]
    for key, value in ctc.state_dict().items():
        if not key.startswith("lm_head"):
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    other = Wav2Vec2Model(load_model_config(REPO / "configs/model/tiny_conformer.yaml"))
    with pytest.raises(ValueError, match="another architecture"):
        take_weights(model, other, "init=x")


def _job(shards: Path, out: Path, *extra: str) -> dict:
    args = [f"data.shards=[{shards / 'train'}]", "data.num_workers=0", "data.max_tokens=96000",
            f"trainer.output_dir={out}", "trainer.max_updates=1", "trainer.log_every=1", "trainer.validate_every=0",
            "trainer.checkpoint_every=0", "trainer.threads=1", "valid_shards=[]", *extra]
    done = subprocess.run([sys.executable, "-m", "pretrain", "--config", str(REPO / "configs/pretrain/tiny.yaml"),
                           *args], capture_output=True, text=True, cwd=REPO, check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return {"loss": first["loss"], "log": done.stderr}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_tools.shards import ShardOptions, make_shards
    from data_tools.synthetic import corpus_entries

    root = tmp_path_factory.mktemp("shards")
    make_shards(corpus_entries(0.01, num_speakers=4, seed=0), root / "train", ShardOptions(max_count=20, workers=1))
    return root


@pytest.mark.slow
def test_pretraining_starts_from_the_init_model(pretrained: Wav2Vec2Model, shards: Path, tmp_path: Path) -> None:
    """The first update's loss is the init model's on that batch: the same from its model file and
    from its Hugging Face export (the same weights), another from a fresh model."""
    from speechssl.interop.huggingface import to_huggingface

    pretrained.save(tmp_path / "init.pt")
    to_huggingface(pretrained, "pretraining").save_pretrained(tmp_path / "hf")
    fresh = _job(shards, tmp_path / "fresh")
    from_file = _job(shards, tmp_path / "file", f"init={tmp_path / 'init.pt'}")
    from_hf = _job(shards, tmp_path / "hf_run", f"init={tmp_path / 'hf'}")
    assert from_file["loss"] == pytest.approx(from_hf["loss"], rel=1e-5)
    assert abs(from_file["loss"] - fresh["loss"]) > 1e-3
    assert "initialised fresh: nothing" in from_file["log"]


def test_pretraining_init_from_a_torchaudio_model_takes_its_encoder(tmp_path: Path) -> None:
    """A torchaudio-built model has no quantizer: the task starts from its encoder, the rest fresh."""
    from torchaudio.models import wav2vec2_model

    from pretrain.task import PretrainTask
    from speechssl.interop.torchaudio import from_torchaudio, torchaudio_kwargs

    config = load_model_config(TINY)
    torch.manual_seed(2)
    ta_model = wav2vec2_model(**{**torchaudio_kwargs(config), "aux_num_out": None}).eval()
    from_torchaudio(ta_model).save(tmp_path / "ta.pt")
    model = PretrainTask(config, 10, init=str(tmp_path / "ta.pt")).build_model().eval()
    waves, lengths = _waves()
    with torch.no_grad():
        ours, frames = model.encode(waves, lengths)
        theirs, _ = ta_model(waves, lengths)
    n = int(frames[1])
    torch.testing.assert_close(ours[1, :n], theirs[1, :n], rtol=0, atol=1e-5)


def test_export_command_writes_each_format_from_any_source(pretrained: Wav2Vec2Model, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """`speechssl export SOURCE --format hf|torchaudio|onnx|fairseq|fairseq2`: each file gives the CTC
    model's logits."""
    from speechssl.asr.tokenizer import CharTokenizer
    from speechssl.interop.onnx import OnnxModel
    from speechssl_cli import main as speechssl_main

    tokenizer = CharTokenizer.build(["THE CAT"])
    ctc = CTCModel.from_pretrained(pretrained, len(tokenizer), blank=tokenizer.blank, vocab=tokenizer.vocab,
                                   tokenizer=tokenizer.to_dict()).eval()
    ctc.save(tmp_path / "ctc.pt")
    waves, lengths = _waves()
    with torch.no_grad():
        expected, frames = ctc(waves, lengths)
    for form, out in (("hf", tmp_path / "hf"), ("torchaudio", tmp_path / "ta.pt"), ("onnx", tmp_path / "ctc.onnx")):
        assert speechssl_main(["export", str(tmp_path / "ctc.pt"), "--format", form, "--output", str(out)]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["format"] == form
        if form == "hf":
            logits = speechssl.load(out)(waves, lengths)[0].detach()
        elif form == "torchaudio":
            logits = torch.jit.load(out)(waves, lengths)[0].detach()
        else:
            logits = torch.from_numpy(OnnxModel(out).run(waves.numpy(), lengths.numpy())["logits"])
        for row, n in enumerate(frames.tolist()):
            torch.testing.assert_close(logits[row, :n], expected[row, :n], rtol=0, atol=1e-3)
    for form, out in (("fairseq", tmp_path / "fs" / "checkpoint.pt"), ("fairseq2", tmp_path / "fs2" / "model.pt")):
        assert speechssl_main(["export", str(tmp_path / "ctc.pt"), "--format", form, "--output", str(out)]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["format"] == form
        back = speechssl.load(out)  # by content; fairseq adds its <pad> and </s> classes, never predicted
        kept = [back.vocab.index(token) for token in ctc.vocab]
        log_probs = back(waves, lengths)[0].detach().log_softmax(-1)[..., kept]
        for row, n in enumerate(frames.tolist()):
            torch.testing.assert_close(log_probs[row, :n], expected[row, :n].log_softmax(-1), rtol=0, atol=1e-4)
    assert speechssl_main(["export", str(tmp_path / "ctc.pt"), "--format", "hf", "--output", str(tmp_path / "hf")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert speechssl_main(["export", str(tmp_path / "ctc.pt"), "--layers", "0", "--output", str(tmp_path / "x")]) == 2


def test_finetuning_from_a_ctc_model_keeps_its_encoder_and_makes_a_head_for_the_new_vocabulary(
        pretrained: Wav2Vec2Model, tmp_path: Path) -> None:
    from finetune.__main__ import load_pretrained
    from finetune.config import FinetuneConfig
    from finetune.task import FinetuneTask
    from speechssl.asr.tokenizer import CharTokenizer
    from speechssl.config import build

    old = CharTokenizer.build(["AB"])
    first = CTCModel.from_pretrained(pretrained, len(old), blank=old.blank, vocab=old.vocab, tokenizer=old.to_dict())
    first.save(tmp_path / "first.pt")
    new = CharTokenizer.build(["THE QUICK BROWN FOX"])
    assert len(new) != len(old)
    config = build(FinetuneConfig, REPO / "configs/finetune/tiny.yaml", [f"pretrained={tmp_path / 'first.pt'}"])
    model = FinetuneTask(config, load_pretrained(str(tmp_path / "first.pt")), new).build_model()
    assert model.vocab == new.vocab and model.lm_head.out_features == len(new)
    theirs = first.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith("lm_head"):
            torch.testing.assert_close(value, theirs[key], rtol=0, atol=0, msg=key)
