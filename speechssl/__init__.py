"""speechssl: self-supervised speech pretraining in the wav2vec 2.0 family."""

from speechssl.config import ConfigError
from speechssl.models.config import ModelConfig, load_model_config
from speechssl.models.loading import load
from speechssl.models.wav2vec2 import PretrainOutput, Wav2Vec2Model, load_model

__all__ = ["ConfigError", "ModelConfig", "PretrainOutput", "Wav2Vec2Model", "load", "load_model", "load_model_config"]
__version__ = "0.1.0"
