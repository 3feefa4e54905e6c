"""Typed configuration: dataclass schemas, YAML loading, dotted command-line overrides.

Schemas are plain dataclasses; OmegaConf structured configs do the merging and the type checks, so
an unknown key or a value of the wrong type is reported with its full dotted key before any model is
built. Two additions on top of OmegaConf:

* a section may be given as the path of a YAML file (``model: configs/model/base_transformer.yaml``),
  in the config file or on the command line (``model=configs/model/tiny_transformer.yaml``);
* a section may be polymorphic: its ``type`` key picks the schema from a registry (the context
  network: ``model.context.type: transformer``).

Value checks that types cannot express (ranges, divisibility) live in each schema's
``__post_init__`` and raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")

REPO_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration problem; the message starts with the dotted key at fault."""


def check(condition: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` for ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


# --------------------------------------------------------------------------------------------------
# Model schemas (shared by every context network). Defaults are fairseq's wav2vec 2.0 BASE values.
# --------------------------------------------------------------------------------------------------


def _default_conv_layers() -> list[list[int]]:
    return [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2


@dataclass
class FeatureExtractorConfig:
    """What turns waveforms into frames: the convolutional waveform encoder or log-mel filterbanks.

    type: ``conv`` (wav2vec 2.0's learned waveform encoder, the fields below up to ``conv_bias``)
        or ``fbank`` (Kaldi log-mel filterbanks, 25 ms every 10 ms, ``stack`` frames side by side;
        w2v-BERT and fairseq2's ``Wav2Vec2FbankFeatureExtractor``): nothing to learn below the
        context network, which serves small corpora (bench/RESULTS.md, "AN4").
    mode: ``group_norm`` (one GroupNorm after the first conv, BASE) or ``layer_norm`` (LayerNorm after
        every conv, LARGE). torchaudio ``extractor_mode``, fairseq ``extractor_mode`` ("default" is
        ``group_norm``), Hugging Face ``feat_extract_norm`` ("group" / "layer").
    conv_layers: ``[[channels, kernel, stride], ...]``. torchaudio ``extractor_conv_layer_config``,
        fairseq ``conv_feature_layers``.
    conv_bias: bias in every conv. torchaudio ``extractor_conv_bias``, fairseq ``conv_bias``.
    num_mel_bins: ``fbank`` only: mel bins per 10 ms frame (fairseq2 ``num_fbank_channels``).
    stack: ``fbank`` only: consecutive frames concatenated into one (fairseq2 ``stride``): 2 gives
        50 Hz frames of ``2 * num_mel_bins`` values.
    standardize: ``fbank`` only: each mel bin to zero mean and unit variance over the utterance.
    """

    type: str = "conv"
    mode: str = "group_norm"
    conv_layers: list[list[int]] = field(default_factory=_default_conv_layers)
    conv_bias: bool = False
    num_mel_bins: int = 80
    stack: int = 2
    standardize: bool = True

    def __post_init__(self) -> None:
        check(self.type in ("conv", "fbank"), "model.extractor.type", f"must be 'conv' or 'fbank', got {self.type!r}")
        check(self.num_mel_bins > 0, "model.extractor.num_mel_bins", "must be > 0")
        check(self.stack > 0, "model.extractor.stack", "must be > 0")
        check(self.mode in ("group_norm", "layer_norm"), "model.extractor.mode",
              f"must be 'group_norm' or 'layer_norm', got {self.mode!r}")
        check(len(self.conv_layers) > 0, "model.extractor.conv_layers", "needs at least one layer")
        for i, layer in enumerate(self.conv_layers):
            check(len(layer) == 3 and all(v > 0 for v in layer), f"model.extractor.conv_layers[{i}]",
                  f"must be [channels, kernel, stride] of positive integers, got {list(layer)}")


@dataclass
class QuantizerConfig:
    """Gumbel product quantizer of the targets.

    num_groups: G, fairseq ``latent_groups``, HF ``num_codevector_groups``.
    num_vars: V entries per group, fairseq ``latent_vars``, HF ``num_codevectors_per_group``.
    codevector_dim: size of a full (concatenated) codevector; 0 means ``final_dim``. fairseq
        ``latent_dim``, HF ``codevector_dim``.
    weight_proj_depth / weight_proj_factor: MLP producing the code logits, fairseq
        ``quantizer_depth`` / ``quantizer_factor``.
    temp_start / temp_end / temp_decay: Gumbel temperature ``max(start * decay**updates, end)``,
        fairseq ``latent_temp``.
    """

    num_groups: int = 2
    num_vars: int = 320
    codevector_dim: int = 0
    weight_proj_depth: int = 1
    weight_proj_factor: int = 3
    temp_start: float = 2.0
    temp_end: float = 0.5
    temp_decay: float = 0.999995

    def __post_init__(self) -> None:
        check(self.num_groups >= 1, "model.quantizer.num_groups", "must be >= 1")
        check(self.num_vars >= 2, "model.quantizer.num_vars", "must be >= 2")
        check(self.codevector_dim >= 0, "model.quantizer.codevector_dim", "must be >= 0 (0 = final_dim)")
        check(self.weight_proj_depth >= 1, "model.quantizer.weight_proj_depth", "must be >= 1")
        check(self.weight_proj_factor >= 1, "model.quantizer.weight_proj_factor", "must be >= 1")
        check(math.isfinite(self.temp_start), "model.quantizer.temp_start", "must be finite")
        check(0 < self.temp_end <= self.temp_start, "model.quantizer.temp_end",
              "must satisfy 0 < temp_end <= temp_start")
        check(0 < self.temp_decay <= 1, "model.quantizer.temp_decay", "must be in (0, 1]")


@dataclass
class MaskingConfig:
    """Span masking of the context network's input, with fairseq's semantics and names.

    mask_prob / mask_length / min_masks: each row gets ``max(min_masks, int(mask_prob * T /
        mask_length + U[0,1)))`` span starts of ``mask_length`` frames (``mask_selection: static``).
    require_same_masks: trim every row to the smallest masked count of the batch.
    mask_dropout: fraction of the masked frames unmasked again.
    no_overlap / min_space: fairseq ``no_mask_overlap`` / ``mask_min_space``.
    channel_prob / channel_length: fairseq ``mask_channel_prob`` / ``mask_channel_length``
        (channels of the projected features are zeroed).
    """

    mask_prob: float = 0.65
    mask_length: int = 10
    min_masks: int = 2
    require_same_masks: bool = True
    mask_dropout: float = 0.0
    no_overlap: bool = False
    min_space: int = 1
    channel_prob: float = 0.0
    channel_length: int = 10

    def __post_init__(self) -> None:
        check(0.0 <= self.mask_prob <= 1.0, "model.masking.mask_prob", "must be in [0, 1]")
        check(self.mask_length >= 1, "model.masking.mask_length", "must be >= 1")
        check(self.min_masks >= 0, "model.masking.min_masks", "must be >= 0")
        check(0.0 <= self.mask_dropout < 1.0, "model.masking.mask_dropout", "must be in [0, 1)")
        check(self.min_space >= 0, "model.masking.min_space", "must be >= 0")
        check(0.0 <= self.channel_prob <= 1.0, "model.masking.channel_prob", "must be in [0, 1]")
        check(self.channel_length >= 1, "model.masking.channel_length", "must be >= 1")


@dataclass
class LossConfig:
    """Contrastive and auxiliary losses.

    num_negatives: distractors per masked frame from the same utterance (fairseq ``num_negatives``).
    cross_sample_negatives: distractors from any utterance of the batch.
    logit_temp: cosine similarities are divided by it (fairseq ``logit_temp``).
    diversity_weight / feature_penalty_weight: fairseq ``loss_weights`` ``[0.1, 10]``.
    """

    num_negatives: int = 100
    cross_sample_negatives: int = 0
    logit_temp: float = 0.1
    diversity_weight: float = 0.1
    feature_penalty_weight: float = 10.0

    def __post_init__(self) -> None:
        check(self.num_negatives >= 0, "model.loss.num_negatives", "must be >= 0")
        check(self.cross_sample_negatives >= 0, "model.loss.cross_sample_negatives", "must be >= 0")
        check(self.num_negatives + self.cross_sample_negatives > 0, "model.loss.num_negatives",
              "num_negatives + cross_sample_negatives must be > 0")
        check(self.logit_temp > 0, "model.loss.logit_temp", "must be > 0")


def _context_schema(type_name: str) -> type:
    from speechssl.models.context import context_config_class  # late: the registry imports this module

    return context_config_class(type_name)


@dataclass
class ModelConfig:
    """The whole wav2vec 2.0 model.

    context: the context network; ``context.type`` picks its schema (``transformer``, ...).
    feature_grad_mult: scales the extractor's gradients; 0 runs it without gradients (fairseq name).
    dropout_input: dropout after the projection to the context width (fairseq ``dropout_input``,
        torchaudio ``encoder_projection_dropout``, HF ``feat_proj_dropout``).
    dropout_features: dropout on the unmasked features fed to the quantizer (fairseq name).
    final_dim: width of the space where predictions and targets are compared (fairseq ``final_dim``,
        HF ``proj_codevector_dim``).
    aux_num_out: optional linear head on the context output (torchaudio ``aux_num_out``).
    """

    extractor: FeatureExtractorConfig = field(default_factory=FeatureExtractorConfig)
    context: Any = field(default_factory=lambda: {"type": "transformer"},
                         metadata={"schema_by_type": _context_schema})
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    feature_grad_mult: float = 1.0
    dropout_input: float = 0.0
    dropout_features: float = 0.0
    final_dim: int = 256
    aux_num_out: Optional[int] = None  # noqa: UP045  (OmegaConf needs typing.Optional on Python 3.10)

    def __post_init__(self) -> None:
        if isinstance(self.context, str):  # ModelConfig(context="transformer")
            self.context = {"type": self.context}
        if isinstance(self.context, dict):  # built in Python as ModelConfig(context={"type": ...})
            try:
                self.context = _context_schema(self.context.get("type", "transformer"))(**self.context)
            except KeyError as e:
                raise ConfigError(f"model.context.type: {e.args[0]}") from None
            except TypeError as e:
                raise ConfigError(f"model.context: {e}") from None
        check(self.feature_grad_mult >= 0, "model.feature_grad_mult", "must be >= 0")
        check(0 <= self.dropout_input < 1, "model.dropout_input", "must be in [0, 1)")
        check(0 <= self.dropout_features < 1, "model.dropout_features", "must be in [0, 1)")
        check(self.final_dim > 0, "model.final_dim", "must be > 0")
        check(self.aux_num_out is None or self.aux_num_out > 0, "model.aux_num_out", "must be > 0")
        check(self.codevector_dim % self.quantizer.num_groups == 0, "model.quantizer.codevector_dim",
              f"{self.codevector_dim} is not divisible by num_groups={self.quantizer.num_groups}")

    @property
    def codevector_dim(self) -> int:
        return self.quantizer.codevector_dim or self.final_dim


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _is_schema(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _read_yaml(path: Path, key: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    check(isinstance(data, dict), key, f"{path} must hold a mapping, got {type(data).__name__}")
    return data


def _find_file(value: str, key: str, base_dir: Path | None) -> Path:
    candidates = [Path(value)]
    if base_dir is not None:
        candidates.append(base_dir / value)
    candidates.append(REPO_CONFIG_DIR.parent / value)
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(f"{key}: config file {value!r} not found")


def _structure(schema: type, raw: Any, key: str, base_dir: Path | None) -> DictConfig:
    """Resolve file includes and polymorphic sections of ``raw``, then merge it into ``schema``."""
    if isinstance(raw, str):
        path = _find_file(raw, key or "config", base_dir)
        raw, base_dir = _read_yaml(path, key or "config"), path.parent
    if raw is None:
        raw = {}
    check(isinstance(raw, dict), key or "config", f"expected a mapping, got {raw!r}")
    raw = dict(raw)
    hints = get_type_hints(schema)
    sub_nodes = {}
    for f in dataclasses.fields(schema):
        if f.name not in raw:
            continue
        sub_key = f"{key}.{f.name}" if key else f.name
        pick: Callable[[str], type] | None = f.metadata.get("schema_by_type")
        if pick is not None:
            value = raw.pop(f.name)
            if isinstance(value, str):
                path = _find_file(value, sub_key, base_dir)
                value = _read_yaml(path, sub_key)
            check(isinstance(value, dict), sub_key, f"expected a mapping, got {value!r}")
            value = {"type": f.default_factory()["type"], **value}  # the default type unless named
            try:
                sub_schema = pick(value["type"])
            except (KeyError, TypeError) as e:
                raise ConfigError(f"{sub_key}.type: {e.args[0]}") from None
            sub_nodes[f.name] = _structure(sub_schema, value, sub_key, base_dir)
        elif _is_schema(hints[f.name]):
            sub_nodes[f.name] = _structure(hints[f.name], raw.pop(f.name), sub_key, base_dir)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), raw)
        # Sections replace the defaults rather than merge into them: a polymorphic section (at any
        # depth) may pick another schema than the default's.
        for name, node in sub_nodes.items():
            if OmegaConf.get_type(merged, name) is not OmegaConf.get_type(node):
                merged[name] = None
            merged[name] = node
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e, key)) from None
    return merged


def _describe(e: OmegaConfBaseException, prefix: str) -> str:
    full_key = getattr(e, "full_key", None) or ""
    full_key = f"{prefix}.{full_key}" if prefix and full_key else (full_key or prefix or "config")
    msg = getattr(e, "msg", None) or str(e)
    msg = msg.splitlines()[0]
    if msg.startswith("Key '") and "not in" in msg:
        msg = "unknown key"
    return f"{full_key}: {msg}"


def _check_finite(value: Any, key: str) -> None:
    """No setting of any schema is meant to be NaN or infinite (``trainer.lr=.inf`` would train
    nothing and export non-finite weights, yet every other check passes)."""
    numbers = value if isinstance(value, list) else [value]
    for number in numbers:
        if isinstance(number, float) and not math.isfinite(number):
            raise ConfigError(f"{key}: must be a finite number, got {number}")


def _to_object(schema: type[T], node: DictConfig, key: str = "") -> T:
    """Instantiate the dataclasses of a merged config (``__post_init__`` checks run here)."""
    values = {}
    for f in dataclasses.fields(schema):
        value, full_key = node[f.name], f"{key}.{f.name}" if key else f.name
        if isinstance(value, DictConfig) and _is_schema(OmegaConf.get_type(value)):
            value = _to_object(OmegaConf.get_type(value), value, full_key)
        elif OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        _check_finite(value, full_key)
        values[f.name] = value
    return schema(**values)


def build(schema: type[T], raw: dict | str | os.PathLike | None = None, overrides: Sequence[str] = (),
          base_dir: str | os.PathLike | None = None) -> T:
    """Build a validated ``schema`` instance from a mapping or YAML path plus dotted overrides.

    Overrides look like ``model.context.num_layers=4`` or ``model=configs/model/tiny_transformer.yaml``
    and apply in order, after the file. Raises :class:`ConfigError` naming the key at fault.
    """
    base = Path(base_dir) if base_dir is not None else None
    if isinstance(raw, os.PathLike):
        raw = os.fspath(raw)
    if isinstance(raw, str):
        path = _find_file(raw, "config", None)
        raw, base = _read_yaml(path, "config"), path.parent
    tree = dict(raw or {})
    for item in overrides:
        check("=" in item, item, "overrides look like dotted.key=value")
        dotted, value = item.split("=", 1)
        parts = dotted.strip().split(".")
        parsed = yaml.safe_load(value) if value.strip() else None
        _set_dotted(tree, parts, parsed, dotted, base)
    merged = _structure(schema, tree, "", base)
    return _to_object(schema, merged)


def _set_dotted(tree: dict, parts: list[str], value: Any, dotted: str, base: Path | None) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str):  # an included file: read it so the override can go inside
            path = _find_file(child, ".".join(parts[: i + 1]), base)
            child = _read_yaml(path, ".".join(parts[: i + 1]))
        if child is None:
            child = {}
        check(isinstance(child, dict), dotted, f"{'.'.join(parts[: i + 1])} is not a section")
        node[part] = child = dict(child)
        node = child
    node[parts[-1]] = value


def load_model_config(source: dict | str | os.PathLike, overrides: Sequence[str] = ()) -> ModelConfig:
    """A :class:`ModelConfig` from a mapping (e.g. a saved model's) or a YAML file of the model section.

    Overrides are relative to the model section: ``context.num_layers=4``.
    """

    @dataclass
    class _Wrapper:
        model: ModelConfig = field(default_factory=ModelConfig)

    raw = {"model": os.fspath(source) if isinstance(source, os.PathLike) else source}
    return build(_Wrapper, raw, [f"model.{o}" for o in overrides]).model


def to_dict(config: Any) -> dict:
    """A plain nested dict of a config (what a saved model stores)."""
    return dataclasses.asdict(config)
