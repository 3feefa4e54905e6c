"""The ``speechssl`` command: its subcommands, help without heavy imports, the older entry points
as aliases, ``--print-config`` and ``--dry-run`` of the jobs, and ``export``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import yaml

import speechssl_cli
from tests.conftest import REPO

PRETRAIN = str(REPO / "configs/pretrain/tiny.yaml")
FINETUNE = str(REPO / "configs/finetune/tiny.yaml")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
HEAVY = ("torch", "deepspeed", "webdataset", "omegaconf", "transformers", "speechssl", "pretrain", "finetune",
         "data_tools")


def _speechssl(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "speechssl_cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=ENV, check=False, timeout=timeout)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _every_parser() -> list[tuple[str, argparse.ArgumentParser]]:
    """Every subcommand's parser, the data tools' own subcommands included."""
    found = []
    for name, parser in _subparsers(speechssl_cli.build_parser()).items():
        found.append((name, parser))
        if name == "data":
            found += [(f"data {sub}", p) for sub, p in _subparsers(parser).items()]
    return found


# -- the command and its help


def test_the_console_script_lists_every_subcommand() -> None:
    script = shutil.which("speechssl", path=str(Path(sys.executable).parent))
    assert script, "the speechssl console script is not installed (pip install -e .)"
    done = subprocess.run([script, "--help"], capture_output=True, text=True, cwd=REPO, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    expected = ["data", "pretrain", "finetune", "transcribe", "evaluate", "emissions", "build-lm", "tune-lm",
                "average", "extract", "report", "overfit", "demo", "export", "pseudo-label"]
    assert set(speechssl_cli.COMMANDS) == set(expected)
    for name in expected:
        line = next((line for line in done.stdout.splitlines() if line.split()[:1] == [name]), None)
        assert line is not None, f"{name} missing from --help"
    text = " ".join(done.stdout.split())
    for name, command in speechssl_cli.COMMANDS.items():
        assert f"{name} {command.summary}" in text, name  # each with its one-line description


def test_version_is_the_package_version() -> None:
    done = _speechssl("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"speechssl {version('speechssl')}"


@pytest.mark.parametrize("name", [*speechssl_cli.COMMANDS, "data make-shards", "data synth"])
def test_each_subcommand_help_exits_0_with_its_defaults(name: str) -> None:
    done = _speechssl(*name.split(), "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: speechssl {name}")
    parser = dict(_every_parser())[name]
    for action in parser._actions:
        default = action.default
        if action.option_strings and action.help != argparse.SUPPRESS and not action.required and not (
                default is None or default is False or default == [] or default == argparse.SUPPRESS):
            assert f"(default: {default})" in " ".join(done.stdout.split()), (name, action.dest)


def test_a_subcommand_with_defaults_shows_them() -> None:
    done = _speechssl("transcribe", "--help")
    text = " ".join(done.stdout.split())
    assert "padded audio per batch (default: 300.0)" in text and "(default: auto)" in text


@pytest.mark.parametrize(("name", "parser"), _every_parser(), ids=[n for n, _ in _every_parser()])
def test_every_option_has_help(name: str, parser: argparse.ArgumentParser) -> None:
    undocumented = [a.dest for a in parser._actions if not a.help and not isinstance(a, argparse._HelpAction)]
    assert not undocumented, (name, undocumented)


def test_building_the_parsers_imports_nothing_heavy() -> None:
    script = ("import sys, speechssl_cli; speechssl_cli.build_parser(); "
              "[speechssl_cli.parser_for(n, 'x') for n in speechssl_cli.COMMANDS]; "
              f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == "[]", done.stdout


@pytest.mark.parametrize(("module", "argv"), [
    ("pretrain.__main__", ["--help"]), ("pretrain.__main__", ["report", "-h"]), ("finetune.__main__", ["--help"]),
    ("finetune.__main__", ["transcribe", "--help"]), ("finetune.__main__", ["average", "--help"]),
    ("data_tools.cli", ["synth", "--help"]), ("pretrain.demo", ["--help"])])
def test_the_older_entry_points_answer_help_without_torch(module: str, argv: list[str]) -> None:
    """``python -m pretrain --help`` and the others: the same parsers, no heavy import, and the
    demo builds no corpus."""
    script = (f"import sys\nfrom {module} import main\ntry:\n    main({argv!r})\nexcept SystemExit as e:\n"
              f"    assert e.code == 0, e.code\nprint(sorted(m for m in {HEAVY[:5]!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=False,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("[]"), done.stdout[-500:]
    assert "usage: python -m " in done.stdout


def test_the_alias_has_the_same_arguments() -> None:
    alias = subprocess.run([sys.executable, "-m", "pretrain", "--help"], capture_output=True, text=True, cwd=REPO,
                           check=False, timeout=60)
    assert alias.returncode == 0, alias.stderr
    assert alias.stdout.startswith("usage: python -m pretrain")
    own = _speechssl("pretrain", "--help").stdout
    assert " ".join(alias.stdout.split()).replace("python -m pretrain", "speechssl pretrain") == " ".join(own.split())


def test_shard_and_window_defaults_are_the_libraries() -> None:
    """The parsers cannot import ShardOptions or Windows (torch): their defaults are written out,
    and held equal to those here."""
    from dataclasses import asdict

    from data_tools.shards import ShardOptions
    from speechssl.asr.inference import Windows

    parsers = dict(_every_parser())
    for name, schema in (("data make-shards", ShardOptions()), ("data synth", ShardOptions()),
                         ("transcribe", Windows()), ("evaluate", Windows()), ("emissions", Windows()),
                         ("tune-lm", Windows())):
        defaults = {a.dest: a.default for a in parsers[name]._actions}
        assert {k: defaults[k] for k in asdict(schema)} == asdict(schema), name


# -- --print-config and --dry-run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny labelled synthetic corpus, made with ``speechssl data synth``."""
    root = tmp_path_factory.mktemp("cli") / "synth"
    done = _speechssl("data", "synth", "--output", str(root), "--hours", "0.02", "--speakers", "4", "--dev-speakers",
                      "1", "--max-count", "8", "--workers", "2", "--quiet", timeout=300)
    assert done.returncode == 0, done.stderr
    return root


def _data(corpus: Path, out: Path, **trainer) -> list[str]:
    settings = {"log_every": 1, "validate_every": 0, "checkpoint_every": 2, "threads": 1, "max_updates": 2,
                **trainer}
    return [f"data.shards=[{corpus / 'train'}]", f"valid_shards=[{corpus / 'dev'}]", "data.num_workers=1",
            f"trainer.output_dir={out}", *(f"trainer.{k}={v}" for k, v in settings.items())]


def test_print_config_is_yaml_and_round_trips(tmp_path: Path) -> None:
    done = _speechssl("pretrain", "--config", PRETRAIN, "trainer.max_updates=7", "model.context.num_layers=1",
                      "--print-config")
    assert done.returncode == 0, done.stderr
    tree = yaml.safe_load(done.stdout)
    assert tree["trainer"]["max_updates"] == 7 and tree["model"]["context"]["num_layers"] == 1
    assert list(tree) == ["model", "init", "data", "valid_shards", "trainer"]  # the schema's order, not sorted
    saved = tmp_path / "resolved.yaml"
    saved.write_text(done.stdout)
    again = _speechssl("pretrain", "--config", str(saved), "--print-config")
    assert again.returncode == 0, again.stderr
    assert again.stdout == done.stdout
    assert not tmp_path.joinpath("runs").exists()


def test_print_config_reports_a_config_error_in_one_line() -> None:
    done = _speechssl("pretrain", "--config", PRETRAIN, "trainer.max_updatez=7", "--print-config")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("config error: trainer.max_updatez") and "Traceback" not in done.stderr, done.stderr


def test_the_launchers_local_rank_is_accepted_first() -> None:
    """``deepspeed $(which speechssl) pretrain ...`` runs ``speechssl --local_rank=0 pretrain ...``."""
    done = _speechssl("--local_rank=0", "pretrain", "--config", PRETRAIN, "--print-config")
    assert done.returncode == 0, done.stderr


def test_dry_run_prints_the_plan_and_writes_nothing(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = _speechssl("pretrain", "--config", PRETRAIN, *_data(corpus, out), "data.max_tokens=96000", "--dry-run")
    assert done.returncode == 0, done.stderr
    plan = dict(line.split(":", 1) for line in done.stdout.splitlines()[1:])
    assert "0.31M parameters" in plan["model"]
    index = json.loads((corpus / "train" / "index.json").read_text())
    assert f"{index['totals']['num_samples']} utterances" in plan["train data"]
    assert f"{index['totals']['shards']} shards" in plan["train data"]
    assert "6 s of padded audio per micro-batch" in plan["batch"] and "= 6 s per update" in plan["batch"]
    assert plan["updates"].strip().startswith("2 ")
    assert plan["output_dir"].strip() == f"{out} (new)"
    assert plan["device"].strip().startswith("cpu")
    assert not out.exists()


def test_dry_run_of_finetuning_loads_the_pretrained_model(corpus: Path, tmp_path: Path) -> None:
    from speechssl import Wav2Vec2Model, load_model_config

    Wav2Vec2Model(load_model_config(REPO / "configs/model/tiny_transformer.yaml")).save(tmp_path / "init.pt")
    out = tmp_path / "run"
    done = _speechssl("finetune", "--config", FINETUNE, f"pretrained={tmp_path / 'init.pt'}", *_data(corpus, out),
                      "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "CTC head over" in done.stdout and "valid data:" in done.stdout
    assert not out.exists()
    missing = _speechssl("finetune", "--config", FINETUNE, f"pretrained={tmp_path / 'nothing.pt'}",
                         *_data(corpus, out), "--dry-run")
    assert missing.returncode == 2 and missing.stderr.startswith("config error: pretrained:"), missing.stderr


def test_dry_run_names_missing_shards(tmp_path: Path) -> None:
    done = _speechssl("pretrain", "--config", PRETRAIN, f"data.shards=[{tmp_path / 'nowhere'}]", "--dry-run")
    assert done.returncode == 2 and done.stderr.startswith("config error: data.shards:"), done.stderr
    assert "Traceback" not in done.stderr


# -- export


def _job(job: str, config: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", job, "--config", config, *args], capture_output=True, text=True,
                          cwd=REPO, env=ENV, check=False, timeout=600)


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def finished_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretraining run of 4 updates, checkpointed at 2 and 4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    done = _job("pretrain", PRETRAIN, [*_data(corpus, out, max_updates=4), "data.max_tokens=96000"])
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_dry_run_of_a_resume_names_its_changes_and_refuses_what_the_resume_would(corpus: Path,
                                                                                  finished_run: Path) -> None:
    saved = (finished_run / "config.yaml").read_text()
    args = [*_data(corpus, finished_run, max_updates=4), "data.max_tokens=96000"]
    longer = _speechssl("pretrain", "--config", PRETRAIN, *args, "trainer.max_updates=6", "--dry-run")
    assert longer.returncode == 0, longer.stderr
    assert "resumes from" in longer.stdout and "changes taken on resume: trainer.max_updates 4 -> 6" in longer.stdout
    other = _speechssl("pretrain", "--config", PRETRAIN, *args, "trainer.lr=0.5", "--dry-run")
    assert other.returncode == 2 and other.stderr.startswith("config error:"), other.stderr
    assert "resuming would mix the two: trainer.lr" in other.stderr
    assert (finished_run / "config.yaml").read_text() == saved and not (finished_run / "config_changes.jsonl").exists()


def test_export_writes_the_model_the_run_writes(finished_run: Path, tmp_path: Path) -> None:
    """From the run folder (its newest checkpoint): the very model.pt the run exported at its end;
    from an earlier checkpoint folder: the model of that update."""
    from speechssl import load_model

    out = finished_run
    exported = _speechssl("export", str(out), "--output", str(tmp_path / "exported.pt"))
    assert exported.returncode == 0, exported.stderr
    summary = json.loads(exported.stdout.splitlines()[-1])
    assert summary["update"] == 4 and summary["run"] == "pretraining"
    assert _same_weights(load_model(tmp_path / "exported.pt").state_dict(), load_model(out / "model.pt").state_dict())
    earlier = _speechssl("export", str(out / "checkpoints" / "update_00000002"), "--output", str(tmp_path / "u2.pt"))
    assert earlier.returncode == 0 and json.loads(earlier.stdout.splitlines()[-1])["update"] == 2
    assert not _same_weights(load_model(tmp_path / "u2.pt").state_dict(), load_model(out / "model.pt").state_dict())
    again = _speechssl("export", str(out), "--output", str(tmp_path / "exported.pt"))
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_export_errors_are_one_line(tmp_path: Path) -> None:
    for source, words in ((tmp_path / "nothing", "does not exist"), (tmp_path, "holds no complete checkpoint")):
        done = _speechssl("export", str(source), "--output", str(tmp_path / "m.pt"))
        assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr, done.stderr
    (tmp_path / "checkpoints" / "update_00000002").mkdir(parents=True)
    done = _speechssl("export", str(tmp_path / "checkpoints" / "update_00000002"), "--output", str(tmp_path / "m.pt"))
    assert done.returncode == 2 and "not a complete checkpoint" in done.stderr, done.stderr


@pytest.mark.slow
def test_export_of_a_stopped_finetuning_run_is_its_ctc_model(corpus: Path, tmp_path: Path) -> None:
    """A fine-tuning run stopped at update 2 (``trainer.stop_at``) exports no model.pt; ``export``
    gives the CTC model, with its tokenizer, that a run of 2 updates writes."""
    from speechssl import Wav2Vec2Model, load_model_config
    from speechssl.models.ctc import load_ctc_model

    Wav2Vec2Model(load_model_config(REPO / "configs/model/tiny_transformer.yaml")).save(tmp_path / "init.pt")
    pretrained = f"pretrained={tmp_path / 'init.pt'}"
    whole = _job("finetune", FINETUNE, [pretrained, *_data(corpus, tmp_path / "whole")])
    stopped = _job("finetune", FINETUNE, [pretrained, *_data(corpus, tmp_path / "stopped", max_updates=6, stop_at=2)])
    assert whole.returncode == 0 and stopped.returncode == 0, (whole.stderr[-2000:], stopped.stderr[-2000:])
    assert not (tmp_path / "stopped" / "model.pt").exists()
    done = _speechssl("export", str(tmp_path / "whole"), "--output", str(tmp_path / "whole.pt"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["run"] == "fine-tuning"
    mine, theirs = load_ctc_model(tmp_path / "whole.pt"), load_ctc_model(tmp_path / "whole" / "model.pt")
    assert _same_weights(mine.state_dict(), theirs.state_dict()) and mine.tokenizer == theirs.tokenizer
    done = _speechssl("export", str(tmp_path / "stopped"), "--output", str(tmp_path / "stopped.pt"))
    assert done.returncode == 0, done.stderr
    assert load_ctc_model(tmp_path / "stopped.pt").vocab == theirs.vocab
