"""The pretraining job end to end on CPU: real DeepSpeed (gloo), real shards, real checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_tools.shards import ShardOptions, make_shards
from data_tools.synthetic import corpus_entries
from pretrain.__main__ import load_config
from speechssl import load_model
from speechssl.config import ConfigError
from speechssl.models.context import registered_contexts
from speechssl.training.schedule import eden
from tests.conftest import REPO, deepspeed_launcher

CONFIG = str(REPO / "configs/pretrain/tiny.yaml")
HOURS_PER_UPDATE = 96000 / 16000 / 3600  # data.max_tokens of _args at 16 kHz
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    entries = corpus_entries(0.04, num_speakers=6, seed=5)
    make_shards([e for e in entries if e.speaker != "spk005"], root / "train", ShardOptions(max_count=8, workers=2),
                progress=False)
    make_shards([e for e in entries if e.speaker == "spk005"], root / "dev", ShardOptions(workers=2), progress=False)
    return root


def _args(shards: Path, out: Path, **trainer) -> list[str]:
    settings = {"log_every": 1, "validate_every": 3, "checkpoint_every": 3, "max_valid_batches": 2, "threads": 1,
                "max_updates": 6, **trainer}
    return [f"data.shards=[{shards / 'train'}]", f"valid_shards=[{shards / 'dev'}]", "data.num_workers=1",
            "data.max_tokens=96000", f"trainer.output_dir={out}",
            *(f"trainer.{k}={v}" for k, v in settings.items())]


def _run(args: list[str], launcher: list[str] | None = None, script: str | None = None,
         config: str = CONFIG) -> subprocess.CompletedProcess:
    if script is not None:
        cmd = [sys.executable, "-c", script, *args]
    else:
        cmd = [*(launcher or [sys.executable, "-m"]), "pretrain", "--config", config, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ENV, check=False, timeout=600)


def _metrics(out: Path, split: str = "train") -> dict[int, dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["update"]: r for r in map(json.loads, lines) if r["split"] == split}


def test_config_errors_are_clear_before_any_model(shards: Path, tmp_path: Path) -> None:
    good = _args(shards, tmp_path / "run")
    cases = [
        (["model.context.num_layerz=1"], "model.context.num_layerz: unknown key"),
        (["trainer.lr=fast"], "trainer.lr: Value 'fast'"),
        ([f"data.shards=[{tmp_path / 'nowhere'}]"], "data.shards: shard directory"),
        ([f"valid_shards=[{tmp_path}]"], "valid_shards:"),
        (["trainer.update_freq=0"], "trainer.update_freq: must be >= 1"),
        (["trainer.optimizer=scaled_adam"], "scaled_adam needs each parameter tensor whole and in fp32"),
        (["trainer.lr_schedule=cosine"], "must be polynomial, constant, tri_stage or eden"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError) as err:
            load_config(CONFIG, [*good, *extra])
        assert message in str(err.value), str(err.value)
    ds_cases = [
        ({"optimizer": {"type": "Adam"}, "gradient_clipping": 1.0}, "has an 'optimizer' section"),
        ({"gradient_accumulation_steps": 4, "gradient_clipping": 1.0}, "contradicts trainer.update_freq=1"),
        ({"train_batch_size": 32, "gradient_clipping": 1.0}, "sets train_batch_size"),
        ({"zero_optimization": {"stage": 1}}, "gradient_clipping explicitly"),
        ({"fp16": {"enabled": True}, "gradient_clipping": 1.0}, "needs a GPU"),
        ({"zero_optimization": {"stage": 3}, "gradient_clipping": 1.0}, "stage 3 is not supported"),
        ({"torch_autocast": {"enabled": True}, "bf16": {"enabled": True}, "gradient_clipping": 0.0},
         "torch_autocast together with fp16 or bf16"),
    ]
    for ds, message in ds_cases:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(ds))
        with pytest.raises(ConfigError) as err:
            load_config(CONFIG, [*good, f"trainer.deepspeed={path}", "trainer.device=cpu"])
        assert message in str(err.value), str(err.value)
    out = _run([*good, "model.context.num_layerz=1"])
    assert out.returncode == 2 and "config error: model.context.num_layerz: unknown key" in out.stderr
    assert not (tmp_path / "run").exists()  # nothing was built or written


@pytest.mark.slow
def test_resume_continues_the_uninterrupted_run(shards: Path, tmp_path: Path) -> None:
    straight = _run(_args(shards, tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = _run(_args(shards, tmp_path / "b", stop_at=3))
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (tmp_path / "b" / "model.pt").exists()  # stopped early: no export yet
    second = _run(_args(shards, tmp_path / "b"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for update in range(1, 7):  # fp32 on the CPU: identical, not merely close
        for key in ("loss", "contrastive", "accuracy", "prob_perplexity", "lr"):
            assert a[update][key] == b[update][key], (update, key, a[update][key], b[update][key])
    assert _metrics(tmp_path / "a", "valid")[6] == _metrics(tmp_path / "b", "valid")[6]
    assert a[6]["loss"] < a[1]["loss"]
    model = load_model(tmp_path / "a" / "model.pt")  # standalone, no DeepSpeed
    assert model.config.context.num_layers == 2
    assert (tmp_path / "a" / "tensorboard").is_dir() and list((tmp_path / "a" / "tensorboard").iterdir())
    report = subprocess.run([sys.executable, "-m", "pretrain", "report", str(tmp_path / "a")], capture_output=True,
                            text=True, cwd=REPO, check=False)
    assert report.returncode == 0 and (tmp_path / "a" / "report.png").stat().st_size > 10_000


@pytest.mark.slow
def test_augmented_pretraining_resumes_exactly_and_keeps_models_to_average(shards: Path, tmp_path: Path) -> None:
    """Speed perturbation and gain in the job: a stopped and resumed run gives the losses of an
    uninterrupted one; trainer.average_models keeps the last validated models and averages them."""
    augment = ["data.augment.speed=[0.9,1.0,1.1]", "data.augment.gain_db=[-6,6]", "trainer.average_models=2",
               "trainer.average_by=last", "trainer.validate_every=2"]
    straight = _run([*_args(shards, tmp_path / "a"), *augment])
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = _run([*_args(shards, tmp_path / "b", stop_at=3), *augment])
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run([*_args(shards, tmp_path / "b"), *augment])
    assert second.returncode == 0 and "resumed from" in second.stderr, second.stderr[-3000:]
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [a[u]["loss"] for u in range(1, 7)] == [b[u]["loss"] for u in range(1, 7)]
    plain = _run(_args(shards, tmp_path / "c", max_updates=1))
    assert plain.returncode == 0 and _metrics(tmp_path / "c")[1]["loss"] != a[1]["loss"]  # the audio differs
    kept = sorted(p.name for p in (tmp_path / "a" / "validated").glob("*.pt"))
    assert kept == ["update_00000004.pt", "update_00000006.pt"]
    averaged = torch.load(tmp_path / "a" / "averaged.pt", weights_only=True)
    files = [torch.load(tmp_path / "a" / "validated" / name, weights_only=True)["state_dict"] for name in kept]
    for key, value in averaged["state_dict"].items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (files[0][key] + files[1][key]) / 2)
    assert load_model(tmp_path / "a" / "averaged.pt").config.context.num_layers == 2


def test_max_minutes_ends_the_run_with_a_checkpoint_and_the_model(shards: Path, tmp_path: Path) -> None:
    out = _run(_args(shards, tmp_path / "t", max_minutes=1e-6, validate_every=100, checkpoint_every=100))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trainer.max_minutes (1e-06) reached at update 1" in out.stderr
    assert sorted(_metrics(tmp_path / "t")) == [1]
    assert [p.name for p in (tmp_path / "t" / "checkpoints").iterdir() if p.is_dir()] == ["update_00000001"]
    assert _metrics(tmp_path / "t", "valid")  # validated at its last update, as at max_updates
    assert load_model(tmp_path / "t" / "model.pt").config.context.num_layers == 2


KILL_DURING_SAVE = f"""
import os, sys
from speechssl.training import checkpoint
original = checkpoint._atomic_write
def dying(path, write):
    if path.name == "rank0.pt" and "update_00000004" in str(path):
        os._exit(9)  # killed after DeepSpeed wrote its files, before the checkpoint was complete
    return original(path, write)
checkpoint._atomic_write = dying
from pretrain.__main__ import main
sys.exit(main(["--config", {CONFIG!r}, *sys.argv[1:]]))
"""


def test_a_killed_save_leaves_the_previous_checkpoint(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    killed = _run(_args(shards, out, checkpoint_every=2), script=KILL_DURING_SAVE)
    assert killed.returncode == 9
    root = out / "checkpoints"
    assert (root / "LATEST").read_text().strip() == "update_00000002"
    assert (root / "update_00000004").is_dir() and not (root / "update_00000004" / "COMPLETE").exists()
    resumed = _run(_args(shards, out, checkpoint_every=2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "update_00000002" in resumed.stderr
    assert (root / "LATEST").read_text().strip() == "update_00000006"
    assert sorted(p.name for p in root.glob("update_*")) == ["update_00000004", "update_00000006"]
    assert (root / "update_00000004" / "COMPLETE").exists()  # written again by the resumed run


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_launcher_two_ranks(shards: Path, tmp_path: Path, stage: int) -> None:
    out = tmp_path / f"zero{stage}"
    args = _args(shards, out, max_updates=4, validate_every=4, checkpoint_every=4, record_samples="true",
                 deepspeed=f"configs/deepspeed/zero{stage}_fp32.json")
    result = _run(args, launcher=deepspeed_launcher(2))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert json.loads((out / "world.json").read_text()) == {"world_size": 2, "precision": "fp32", "zero_stage": stage}
    ranks = [[json.loads(line) for line in (out / f"samples.rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [u["update"] for u in ranks[0]] == [u["update"] for u in ranks[1]] == [1, 2, 3, 4]  # equal counts
    seen = [{k for u in rank for k in u["keys"]} for rank in ranks]
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # different data
    metrics = _metrics(out)
    assert sorted(metrics) == [1, 2, 3, 4] and all(m["loss"] > 0 for m in metrics.values())
    assert (out / "checkpoints" / "update_00000004" / "rank1.pt").is_file()
    assert load_model(out / "model.pt") is not None


@pytest.mark.parametrize("context", [c for c in registered_contexts() if c != "transformer"])
def test_the_job_pretrains_other_context_networks(shards: Path, tmp_path: Path, context: str) -> None:
    out = tmp_path / context
    done = _run([f"model={REPO / f'configs/model/tiny_{context}.yaml'}", *_args(shards, out, max_updates=3)])
    assert done.returncode == 0, done.stderr[-3000:]
    model = load_model(out / "model.pt")
    assert model.config.context.type == context
    assert all(r["skipped_updates"] == 0 and r["loss"] > 0 and 0 <= r["loader_wait"] < 1
               for r in _metrics(out).values())
    assert sorted(_metrics(out)) == [1, 2, 3]


@pytest.mark.slow
def test_the_job_trains_the_whole_model_compiled(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "compiled"
    args = _args(shards, out, max_updates=3, checkpoint_every=0, **{"compile": "[model]",
                                                                   "compile_mode": "reduce-overhead"})
    done = _run([*args, "model.context.layer_drop=0.2"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch.compile: model" in done.stderr
    metrics = _metrics(out)
    assert sorted(metrics) == [1, 2, 3]
    assert all(r["skipped_updates"] == 0 and 0 < r["loss"] < 100 for r in metrics.values())
    assert _metrics(out, "valid")[3]["loss"] > 0
    model = load_model(out / "model.pt")  # the export has the plain parameter names
    assert not any("_orig_mod" in k for k in model.state_dict())


CLIPPING = """
import json, sys, torch
from pretrain.__main__ import load_config
from pretrain.task import PretrainTask
from speechssl.training.job import make_loaders
from speechssl.training.trainer import Trainer

def gradients_at_step(deepspeed_clips):
    config = load_config(sys.argv[1], sys.argv[2:])
    loader, _ = make_loaders(config.data, [], 0, 1)
    trainer = Trainer(PretrainTask(config.model, 10), config.trainer, loader)
    if deepspeed_clips:  # hand the clipping back to DeepSpeed, as before the trainer took it over
        trainer.ds_config = {**trainer.ds_config, "gradient_clipping": trainer.clip_norm}
        trainer.clip_norm = 0.0
    trainer._build_engine()
    seen = []
    step = trainer.engine.optimizer.step
    def recording_step(*args, **kwargs):
        seen.extend(p.grad.clone() for p in trainer.engine.module.parameters() if p.grad is not None)
        return step(*args, **kwargs)
    trainer.engine.optimizer.step = recording_step
    torch.manual_seed(0)
    trainer._train_update([next(iter(loader))], {})
    return seen, trainer._grad_norm

ours, raw = gradients_at_step(False)
theirs, _ = gradients_at_step(True)
print(json.dumps({"raw": float(raw), "clipped": float(torch.nn.utils.get_total_norm(ours)),
                  "max_difference": max(float((a - b).abs().max()) for a, b in zip(ours, theirs, strict=True))}))
"""


def test_stage0_clipping_matches_deepspeeds(shards: Path, tmp_path: Path) -> None:
    """At ZeRO stage 0 with fp32 weights the trainer clips with the fused norm it skips
    non-finite updates by; the optimizer sees the gradients DeepSpeed's own clipping gives."""
    ds = tmp_path / "zero0_clip.json"
    ds.write_text(json.dumps({"gradient_clipping": 0.05, "zero_optimization": {"stage": 0}}))
    done = _run([CONFIG, *_args(shards, tmp_path / "run", deepspeed=ds)], script=CLIPPING)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["raw"] > 0.5  # well above the limit, so the clipping acts
    assert result["clipped"] == pytest.approx(0.05, rel=1e-4)
    assert result["max_difference"] < 1e-9


ONE_RANK = """
import json, sys, torch
from pretrain.__main__ import load_config
from pretrain.task import PretrainTask
from speechssl.training.job import make_loaders
from speechssl.training.trainer import Trainer

def train(deepspeed_reduces):
    config = load_config(sys.argv[1], sys.argv[2:])
    loader, _ = make_loaders(config.data, [], 0, 1)
    trainer = Trainer(PretrainTask(config.model, 10), config.trainer, loader)
    trainer._build_engine()
    local = trainer._local_gradients
    if deepspeed_reduces:  # DeepSpeed's single-rank all-reduce, as before the trainer skipped it
        trainer._local_gradients, trainer.engine.enable_backward_allreduce = False, True
    missing = []
    finish = trainer._finish_update
    def counting_finish():
        missing.append(sum(p.grad is None for p in trainer._params))
        finish()
    trainer._finish_update = counting_finish
    torch.manual_seed(0)
    batches = iter(loader)
    for _ in range(3):
        trainer._train_update([next(batches)], {})
    return local, missing, [p.detach().clone() for p in trainer._params]

local, missing, ours = train(False)
_, reduced_missing, theirs = train(True)
print(json.dumps({"local": local, "missing": missing, "reduced_missing": reduced_missing,
                  "equal": all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))}))
"""


def test_one_rank_skips_deepspeeds_all_reduce_and_trains_the_same(shards: Path, tmp_path: Path) -> None:
    """On one rank at stage 0 the trainer skips DeepSpeed's gradient all-reduce (a copy of every
    gradient), and gives the parameters of dropped layers the zero gradients that all-reduce gave:
    three updates with layer drop end with the same parameters, bit for bit."""
    ds = tmp_path / "zero0_clip.json"
    ds.write_text(json.dumps({"gradient_clipping": 1.0, "zero_optimization": {"stage": 0}}))
    args = [CONFIG, *_args(shards, tmp_path / "run", deepspeed=ds), "model.context.layer_drop=0.5"]
    done = _run(args, script=ONE_RANK)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["local"] is True
    assert any(result["missing"])  # dropped layers left gradients to fill
    assert not any(result["reduced_missing"])  # DeepSpeed's all-reduce had filled them
    assert result["equal"]


SKIPPING = """
import json, sys, torch
FUSED = sys.argv[1] == "fused"
Plain = torch.optim.AdamW
class AdamW(Plain):  # the trainer's fused choice (a GPU's) on the CPU, or not
    def __init__(self, *args, fused=None, **kwargs):
        super().__init__(*args, fused=FUSED, **kwargs)
torch.optim.AdamW = AdamW
from pretrain.__main__ import load_config
from pretrain.task import PretrainTask
from speechssl.training.job import make_loaders
from speechssl.training.trainer import Trainer

config = load_config(sys.argv[2], sys.argv[3:])
loader, _ = make_loaders(config.data, [], 0, 1)
trainer = Trainer(PretrainTask(config.model, 10), config.trainer, loader)
trainer._build_engine()
batches = iter(loader)
params = list(trainer.engine.module.parameters())
snapshots = []
for update in range(3):
    if update == 1:  # a non-finite gradient in this update only
        handle = params[-1].register_hook(lambda g: g * float("nan"))
    trainer._train_update([next(batches)], {})
    if update == 1:
        handle.remove()
        pending = trainer._skipped_pending is not None
    snapshots.append([p.detach().clone() for p in params])
steps = {int(s["step"]) for s in trainer._adamw.state.values()}
print(json.dumps({"on_device": trainer._skip_on_device, "decided_on_device": pending,
                  "skipped": trainer._skipped_updates(), "steps": sorted(steps),
                  "second_equals_first": all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1])),
                  "third_moved": any(not torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2])),
                  "finite": all(bool(torch.isfinite(p).all()) for p in params)}))
"""


@pytest.mark.parametrize("optimizer", ["fused", "plain"])
def test_a_non_finite_update_is_skipped_and_counted(shards: Path, tmp_path: Path, optimizer: str) -> None:
    """At stage 0 a NaN gradient skips the whole update and is counted. Fused AdamW (the GPU's)
    decides on the device, with no host synchronisation; otherwise the trainer reads the norm."""
    ds = tmp_path / "zero0_clip.json"
    ds.write_text(json.dumps({"gradient_clipping": 1.0, "zero_optimization": {"stage": 0}}))
    done = _run([optimizer, CONFIG, *_args(shards, tmp_path / "run", deepspeed=ds)], script=SKIPPING)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    fused = optimizer == "fused"
    assert result["on_device"] is fused and result["decided_on_device"] is fused
    assert result["skipped"] == 1 and result["steps"] == [2]  # AdamW stepped for updates 1 and 3 only
    assert result["second_equals_first"] and result["third_moved"] and result["finite"]


def test_zipformer_job_with_scaled_adam_eden_and_autocast_resumes_exactly(shards: Path, tmp_path: Path) -> None:
    """The Zipformer's own recipe through the job: ScaledAdam, Eden, bf16 autocast over fp32
    weights (DeepSpeed's torch_autocast, ZeRO stage 0); the optimizer state survives a resume."""
    config = str(REPO / "configs/pretrain/tiny_zipformer.yaml")
    extra = {"deepspeed": "configs/deepspeed/scaled_adam_bf16.json", "warmup_updates": 4}
    straight = _run(_args(shards, tmp_path / "a", **extra), config=config)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = _run(_args(shards, tmp_path / "b", stop_at=3, **extra), config=config)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run(_args(shards, tmp_path / "b", **extra), config=config)
    assert second.returncode == 0 and "resumed from" in second.stderr, second.stderr[-3000:]
    assert json.loads((tmp_path / "a" / "world.json").read_text())["precision"] == "bf16-autocast"
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for update in range(1, 7):
        for key in ("loss", "contrastive", "lr"):
            assert a[update][key] == b[update][key], (update, key, a[update][key], b[update][key])
        # Eden after `update` updates: warm-up from 0.1 over 4 updates, then the batch factor.
        expected = 0.045 * eden(update, update * HOURS_PER_UPDATE, 7500, 50000, 4, 0.1)
        assert a[update]["lr"] == pytest.approx(expected, rel=1e-4)
    model = load_model(tmp_path / "a" / "model.pt")
    assert model.config.context.type == "zipformer"
    assert next(model.parameters()).dtype == torch.float32
