"""The fine-tuning job end to end on CPU: real DeepSpeed, real labelled shards, real audio files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from data_tools.shards import ShardOptions, make_shards
from data_tools.synthetic import corpus_entries, render
from speechssl.models.ctc import load_ctc_model
from tests.conftest import REPO, deepspeed_launcher

CONFIG = str(REPO / "configs/finetune/tiny.yaml")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TINY = REPO / "configs/model/tiny_transformer.yaml"
pytestmark = pytest.mark.slow  # pretraining, fine-tuning and launcher jobs: minutes on 2 cores


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Labelled synthetic speech: 0.3 h of 40 speakers, 4 of them held out (as the demo's)."""
    root = tmp_path_factory.mktemp("labelled")
    entries = corpus_entries(0.3, num_speakers=40, seed=0)
    dev = {f"spk{i:03d}" for i in range(36, 40)}
    make_shards([e for e in entries if e.speaker not in dev], root / "train", ShardOptions(max_count=50, workers=2),
                progress=False)
    make_shards([e for e in entries if e.speaker in dev], root / "dev", ShardOptions(workers=2), progress=False)
    # A few held-out utterances as audio files, with a TSV manifest, for transcribe and evaluate.
    files = root / "files"
    files.mkdir()
    rows = ["path\ttext"]
    for e in [e for e in entries if e.speaker in dev][:5]:
        sf.write(files / f"{e.id}.wav", render(**e.synth), 16000)
        rows.append(f"{files / (e.id + '.wav')}\t{e.text}")
    (root / "dev.tsv").write_text("\n".join(rows) + "\n")
    return root


def _run(module: str, config: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, "--config", config, *args], capture_output=True, text=True,
                          cwd=REPO, env=ENV, check=False, timeout=1200)


def _metrics(out: Path, split: str) -> dict[int, dict]:
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return {r["update"]: r for r in records if r["split"] == split}


def _data(corpus: Path, out: Path) -> list[str]:
    return [f"data.shards=[{corpus / 'train'}]", f"valid_shards=[{corpus / 'dev'}]", f"trainer.output_dir={out}",
            "trainer.threads=2", "trainer.checkpoint_every=0", "trainer.log_every=50"]


@pytest.fixture(scope="module")
def finetuned(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model pretrained as the demo does (800 updates), then fine-tuned with the shipped config."""
    root = tmp_path_factory.mktemp("runs")
    pretrained = _run("pretrain", str(REPO / "configs/pretrain/tiny.yaml"), [
        f"data.shards=[{corpus / 'train'}]", f"valid_shards=[{corpus / 'dev'}]", f"trainer.output_dir={root / 'pt'}",
        "trainer.max_updates=800", "trainer.validate_every=0", "trainer.checkpoint_every=0", "trainer.threads=2"])
    assert pretrained.returncode == 0, pretrained.stderr[-3000:]
    done = _run("finetune", CONFIG, [f"pretrained={root / 'pt'}", *_data(corpus, root / "ctc")])
    assert done.returncode == 0, done.stderr[-3000:]
    (root / "console.txt").write_text(done.stdout)
    return root / "ctc"


def test_the_console_shows_each_validation_and_names_the_outputs(finetuned: Path) -> None:
    console = (finetuned.parent / "console.txt").read_text()
    shown = re.findall(r"update (\d+) validation: loss [\d.e+-]+, cer [\d.e+-]+, wer [\d.e+-]+", console)
    assert [int(u) for u in shown] == sorted(_metrics(finetuned, "valid"))
    for output in ("model.pt", "best.pt", "averaged.pt", "config.yaml", "metrics.jsonl", "report.png"):
        assert (finetuned / output).exists() == (f"  {output} " in console), output
    assert (finetuned / "report.png").is_file()


def test_finetuning_reaches_a_low_cer_on_held_out_speakers(finetuned: Path) -> None:
    valid = _metrics(finetuned, "valid")
    last = valid[max(valid)]
    assert last["cer"] < 0.20, last
    assert valid[min(valid)]["cer"] > last["cer"]
    best = json.loads((finetuned / "best.json").read_text())
    assert best["wer"] == pytest.approx(min(v["wer"] for v in valid.values()), abs=1e-6)  # the log rounds
    model = load_ctc_model(finetuned / "best.pt")
    assert model.tokenizer["vocab"][:3] == ["<blank>", "<unk>", "|"] and model.blank == 0
    assert all(r["unalignable"] == 0 for r in valid.values())


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, cwd=REPO,
                          env=ENV, check=False, timeout=600)


def test_transcribe_and_evaluate_on_files_manifests_and_shards(finetuned: Path, corpus: Path,
                                                               tmp_path: Path) -> None:
    model = str(finetuned / "best.pt")
    files = _cli("transcribe", model, str(corpus / "files"))
    assert files.returncode == 0, files.stderr[-2000:]
    by_file = dict(line.split("\t") for line in files.stdout.splitlines())
    shards = _cli("transcribe", model, str(corpus / "dev"), "--output", str(tmp_path / "hyps.tsv"))
    assert shards.returncode == 0, shards.stderr[-2000:]
    by_shard = dict(line.split("\t") for line in (tmp_path / "hyps.tsv").read_text().splitlines())
    assert len(by_file) == 5 and set(by_file) <= set(by_shard)
    agree = sum(by_file[k] == by_shard[k] for k in by_file)
    assert agree == 5, (by_file, {k: by_shard[k] for k in by_file})  # same audio, same transcript
    scored = _cli("evaluate", model, str(corpus / "dev"), "--output", str(tmp_path / "eval"))
    assert scored.returncode == 0, scored.stderr[-2000:]
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
    valid = _metrics(finetuned, "valid")
    best = json.loads((finetuned / "best.json").read_text())
    # as the job's validation (logged to 6 places)
    assert scores["wer"] == pytest.approx(valid[best["update"]]["wer"], abs=1e-6)
    rows = (tmp_path / "eval" / "hypotheses.tsv").read_text().splitlines()
    assert rows[0] == "id\treference\thypothesis" and len(rows) == 1 + scores["utterances"]
    manifest = _cli("evaluate", model, str(corpus / "dev.tsv"))
    assert manifest.returncode == 0 and json.loads(manifest.stdout.splitlines()[-1])["utterances"] == 5
    (corpus / "files" / "broken.wav").write_bytes(b"RIFF not audio")
    skipping = _cli("transcribe", model, str(corpus / "files"))
    assert skipping.returncode == 0 and "skipped 1 unreadable input(s): {'unreadable': 1}" in skipping.stderr
    (corpus / "files" / "broken.wav").unlink()


def test_lm_built_tuned_and_used_by_evaluate(finetuned: Path, corpus: Path, tmp_path: Path) -> None:
    """build-lm on the training shards, tune-lm on dev, then evaluate and transcribe with the LM
    folder: its tuned weights are used, and they decode dev at least as well as greedy decoding."""
    lm = tmp_path / "lm"
    built = _cli("build-lm", str(corpus / "train"), "--output", str(lm), "--order", "3")
    assert built.returncode == 0, built.stderr[-2000:]
    info = json.loads(built.stdout.splitlines()[-1])
    assert info["vocabulary"] > 10 and (lm / "lm.arpa").is_file() and (lm / "lexicon.txt").is_file()
    model = str(finetuned / "best.pt")
    tuned = _cli("tune-lm", model, str(corpus / "dev"), "--lm", str(lm), "--lm-weights", "0,1,2",
                 "--word-scores", "0,1", "--blank-penalties", "0,1", "--beam", "20")
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    settings = json.loads((lm / "decoding.json").read_text())
    assert len(settings["grid"]) == 12 and settings["wer"] == min(r["wer"] for r in settings["grid"])
    assert settings["wer"] <= settings["greedy"]["wer"]
    scored = _cli("evaluate", model, str(corpus / "dev"), "--lm", str(lm))
    assert scored.returncode == 0, scored.stderr[-2000:]
    scores = json.loads(scored.stdout.splitlines()[-1])
    assert scores["decoder"] == "beam" and scores["lm_weight"] == settings["lm_weight"] and scores["beam"] == 20
    assert scores["blank_penalty"] == settings["blank_penalty"]
    assert scores["wer"] == pytest.approx(settings["wer"])
    hyps = _cli("transcribe", model, str(corpus / "files"), "--lm", str(lm), "--lm-weight", "0")
    assert hyps.returncode == 0 and len(hyps.stdout.splitlines()) == 5, hyps.stderr[-2000:]
    wrong = _cli("evaluate", model, str(corpus / "dev"), "--decoder", "greedy", "--lm", str(lm))
    assert wrong.returncode == 2 and "--lm and --lexicon need --decoder beam" in wrong.stderr


def test_saved_emissions_decode_and_tune_as_the_model_does(finetuned: Path, corpus: Path, tmp_path: Path) -> None:
    """emissions once, then evaluate and tune-lm from the file: the scores and the tuned settings
    of running the model; the file alone needs neither the model nor the audio."""
    model = str(finetuned / "best.pt")
    saved = _cli("emissions", model, str(corpus / "dev"), "--output", str(tmp_path / "dev.pt"))
    assert saved.returncode == 0, saved.stderr[-2000:]
    direct = json.loads(_cli("evaluate", model, str(corpus / "dev")).stdout.splitlines()[-1])
    replayed = _cli("evaluate", "--emissions", str(tmp_path / "dev.pt"), "--output", str(tmp_path / "eval"))
    assert replayed.returncode == 0, replayed.stderr[-2000:]
    from_file = json.loads(replayed.stdout.splitlines()[-1])
    assert from_file["utterances"] == direct["utterances"] > 0
    assert from_file["word_errors"] == direct["word_errors"] and from_file["char_errors"] == direct["char_errors"]
    lm = tmp_path / "lm"
    assert _cli("build-lm", str(corpus / "train"), "--output", str(lm), "--order", "3").returncode == 0
    grid = ["--lm-weights", "0,1", "--word-scores", "0,1", "--blank-penalties", "0,1", "--beam", "20"]
    grids = []
    for source in ([model, str(corpus / "dev")], ["--emissions", str(tmp_path / "dev.pt")]):
        done = _cli("tune-lm", *source, "--lm", str(lm), *grid)
        assert done.returncode == 0, done.stderr[-2000:]
        grids.append([(r["wer"], r["cer"]) for r in json.loads((lm / "decoding.json").read_text())["grid"]])
    assert len(grids[0]) == 8 and grids[0] == grids[1]
    both = _cli("evaluate", model, str(corpus / "dev"), "--emissions", str(tmp_path / "dev.pt"))
    assert both.returncode == 2 and "not both" in both.stderr


def test_fine_tuning_averages_its_best_models(finetuned: Path, corpus: Path, tmp_path: Path) -> None:
    """trainer.average_models with speed perturbation: averaged.pt is the mean of the kept models,
    and the average command gives the same file from the run folder."""
    out = tmp_path / "avg"
    done = _run("finetune", CONFIG, [f"pretrained={finetuned.parent / 'pt'}", *_data(corpus, out),
                                     "trainer.max_updates=30", "trainer.validate_every=10", "trainer.average_models=2",
                                     "data.augment.speed=[0.9,1.0,1.1]"])
    assert done.returncode == 0, done.stderr[-3000:]
    index = json.loads((out / "validated" / "index.json").read_text())
    valid = _metrics(out, "valid")
    kept = sorted(round(e["metric"], 6) for e in index)
    assert kept == pytest.approx(sorted(r["wer"] for r in valid.values())[:2], abs=1e-6)  # the two best WERs
    assert {e["update"] for e in index} <= set(valid)
    again = _cli("average", str(out), "--best", "2", "--output", str(tmp_path / "again.pt"))
    assert again.returncode == 0, again.stderr[-2000:]
    first, second = (torch.load(p, weights_only=True)["state_dict"]
                     for p in (out / "averaged.pt", tmp_path / "again.pt"))
    assert all(torch.equal(first[k], second[k]) for k in first)
    scored = _cli("evaluate", str(out / "averaged.pt"), str(corpus / "dev"))
    assert scored.returncode == 0, scored.stderr[-2000:]


def test_bpe_tokenizer_is_trained_saved_with_the_model_and_decodes(finetuned: Path, corpus: Path,
                                                                   tmp_path: Path) -> None:
    """tokenizer.type=bpe: rank 0 trains SentencePiece BPE on the training transcripts, writes it to
    the run folder, and the model file carries it: evaluate decodes with it as validation did."""
    out = tmp_path / "bpe"
    done = _run("finetune", CONFIG, [f"pretrained={finetuned.parent / 'pt'}", *_data(corpus, out),
                                     "tokenizer.type=bpe", "tokenizer.vocab_size=40", "trainer.max_updates=30",
                                     "trainer.validate_every=30"])
    assert done.returncode == 0, done.stderr[-3000:]
    model = load_ctc_model(out / "model.pt")
    assert model.tokenizer["type"] == "bpe" and model.blank == 0
    from speechssl.asr.tokenizer import BpeTokenizer, tokenizer_from_dict

    saved = tokenizer_from_dict(model.tokenizer)
    assert saved == BpeTokenizer.load(str(out / "tokenizer.model"))
    assert len(saved) == model.vocab_size <= 41 and any(len(p.lstrip("▁")) > 1 for p in saved.vocab[2:])
    scored = _cli("evaluate", str(out / "best.pt"), str(corpus / "dev"), "--output", str(tmp_path / "eval"))
    assert scored.returncode == 0, scored.stderr[-2000:]
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert scores["wer"] == pytest.approx(_metrics(out, "valid")[30]["wer"], abs=1e-6)


def test_two_ranks_fine_tune_and_validate_on_the_whole_dev_set(finetuned: Path, corpus: Path,
                                                                 tmp_path: Path) -> None:
    """Under the deepspeed launcher (2 CPU ranks, ZeRO-2): each rank trains on its own data, and the
    validation WER/CER, summed over the ranks, equals one process's evaluation of the same model."""
    out = tmp_path / "two"
    args = [f"pretrained={finetuned.parent / 'pt'}", *_data(corpus, out), "trainer.max_updates=30",
            "trainer.validate_every=30", "trainer.record_samples=true", "trainer.threads=1",
            "trainer.deepspeed=configs/deepspeed/zero2_fp32.json"]
    done = subprocess.run([*deepspeed_launcher(2), "finetune", "--config", CONFIG, *args], capture_output=True,
                          text=True, cwd=REPO, env=ENV, check=False, timeout=1200)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert json.loads((out / "world.json").read_text())["world_size"] == 2
    seen = [{k for u in map(json.loads, (out / f"samples.rank{r}.jsonl").read_text().splitlines())
             if u["update"] <= 10 for k in u["keys"]} for r in (0, 1)]  # within the first epoch
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    valid = _metrics(out, "valid")[30]
    scored = _cli("evaluate", str(out / "model.pt"), str(corpus / "dev"))
    assert scored.returncode == 0, scored.stderr[-2000:]
    scores = json.loads(scored.stdout.splitlines()[-1])
    assert valid["utterances"] == scores["utterances"] > 10  # every dev utterance once, over both ranks
    assert valid["wer"] == pytest.approx(scores["wer"], abs=1e-6)
    assert valid["cer"] == pytest.approx(scores["cer"], abs=1e-6)


def _snapshot_script(out: Path) -> str:
    """The job, with the model's parameters per module recorded after every update."""
    return f"""
import sys, torch
from speechssl.training.trainer import Trainer
original = Trainer._train_update
records = []
def recording(self, group, sums):
    original(self, group, sums)
    model = self.engine.module
    lrs = {{id(p): g["lr"] for g in self._adamw.param_groups for p in g["params"]}}
    records.append({{name: torch.cat([p.detach().flatten().clone() for p in module.parameters()])
                    for name, module in model.named_children() if any(True for _ in module.parameters())}})
    records[-1]["lr"] = {{name: lrs.get(id(next(module.parameters())), 0.0) for name, module in model.named_children()
                         if any(True for _ in module.parameters())}}
    torch.save(records, {str(out)!r})
Trainer._train_update = recording
from finetune.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("deepspeed", ["zero1_fp32", "zero2_fp32"])
def test_freezing_schedules_hold_in_the_job(corpus: Path, tmp_path: Path, deepspeed: str) -> None:
    """Each form: frozen modules do not move, and move once unfrozen (with ZeRO's flat buffers too)."""
    from speechssl import Wav2Vec2Model, load_model_config

    Wav2Vec2Model(load_model_config(TINY)).save(tmp_path / "init.pt")  # a random "pretrained" model
    records = tmp_path / "params.pt"
    args = ["--config", CONFIG, f"pretrained={tmp_path / 'init.pt'}", *_data(corpus, tmp_path / "run"),
            "trainer.max_updates=6", "trainer.validate_every=0", "trainer.warmup_updates=0", "trainer.log_every=1",
            f"trainer.deepspeed=configs/deepspeed/{deepspeed}.json",
            "freeze_updates={feature_extractor: -1, context: 2, frontend: [1, 3], lm_head: [4, -1]}"]
    done = subprocess.run([sys.executable, "-c", _snapshot_script(records), *args], capture_output=True, text=True,
                          cwd=REPO, env=ENV, check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    after = torch.load(records)
    assert len(after) == 6
    frozen = {"feature_extractor": set(range(6)), "context": {0, 1}, "frontend": {1, 2, 3}, "lm_head": {4, 5}}
    for module, updates in frozen.items():
        for update in range(1, 6):  # update u changed the parameters iff the module was not frozen at u
            moved = not torch.equal(after[update][module], after[update - 1][module])
            assert moved == (update not in updates), (module, update)


def test_lr_scale_gives_each_module_its_share_of_the_rate(corpus: Path, tmp_path: Path) -> None:
    """lr_scale reaches the optimizer: each module's group runs at its factor of the head's LR."""
    from speechssl import Wav2Vec2Model, load_model_config

    Wav2Vec2Model(load_model_config(TINY)).save(tmp_path / "init.pt")
    records = tmp_path / "params.pt"
    args = ["--config", CONFIG, f"pretrained={tmp_path / 'init.pt'}", *_data(corpus, tmp_path / "run"),
            "trainer.max_updates=3", "trainer.validate_every=0", "trainer.warmup_updates=2",
            "freeze_updates={feature_extractor: -1}", "lr_scale={context: 0.25, frontend: 0.5}",
            "trainer.deepspeed=configs/deepspeed/zero0_fp32.json"]  # ZeRO's groups hold flat copies, not the parameters
    done = subprocess.run([sys.executable, "-c", _snapshot_script(records), *args], capture_output=True, text=True,
                          cwd=REPO, env=ENV, check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    after = torch.load(records)
    for record in after:  # the warm-up starts at 0, where every group's rate is 0
        lr = record["lr"]
        assert lr["feature_extractor"] == 0
        assert lr["context"] == pytest.approx(0.25 * lr["lm_head"])
        assert lr["frontend"] == pytest.approx(0.5 * lr["lm_head"])
    rates = {r["lr"]["lm_head"] for r in after}
    assert len(rates - {0.0}) > 1  # the schedule moves, the ratios stay


def test_a_model_imported_from_torchaudio_fine_tunes(corpus: Path, tmp_path: Path) -> None:
    import torchaudio

    from speechssl.interop.torchaudio import from_torchaudio

    reference = torchaudio.models.wav2vec2_model(
        extractor_mode="group_norm", extractor_conv_layer_config=[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2,
        extractor_conv_bias=False, encoder_embed_dim=48, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=16,
        encoder_pos_conv_groups=4, encoder_num_layers=2, encoder_num_heads=4, encoder_attention_dropout=0.0,
        encoder_ff_interm_features=96, encoder_ff_interm_dropout=0.0, encoder_dropout=0.0,
        encoder_layer_norm_first=False, encoder_layer_drop=0.0, aux_num_out=None)
    imported = from_torchaudio(reference)
    imported.save(tmp_path / "imported.pt")
    done = _run("finetune", CONFIG, [f"pretrained={tmp_path / 'imported.pt'}", *_data(corpus, tmp_path / "run"),
                                     "trainer.max_updates=4", "trainer.validate_every=4", "trainer.log_every=1"])
    assert done.returncode == 0, done.stderr[-3000:]
    train = _metrics(tmp_path / "run", "train")
    assert sorted(train) == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in train.values())
    model = load_ctc_model(tmp_path / "run" / "model.pt")
    state = model.state_dict()
    # The encoder's weights are torchaudio's, untouched where frozen (the extractor, the whole run).
    ta_conv = reference.state_dict()["feature_extractor.conv_layers.0.conv.weight"]
    assert torch.equal(state["feature_extractor.blocks.0.conv.weight"], ta_conv)
    assert model.config.context.embed_dim == 48


def test_config_errors_name_the_key(corpus: Path, tmp_path: Path) -> None:
    cases = [(["freeze_updates={encoder: 5}"], "freeze_updates.encoder: unknown module"),
             ([f"pretrained={tmp_path / 'nothing'}"], "pretrained:"),
             (["tokenizer.type=bpe", f"tokenizer.model={tmp_path / 'sp.model'}"], "tokenizer.model:")]
    for extra, words in cases:
        done = subprocess.run([sys.executable, "-m", "finetune", "--config", CONFIG, *_data(corpus, tmp_path / "x"),
                               *extra], capture_output=True, text=True, cwd=REPO, env=ENV, check=False, timeout=300)
        assert done.returncode == 2 and words in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "x").exists()
