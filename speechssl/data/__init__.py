"""Streaming WebDataset shards into padded batches of audio."""

from speechssl.data.loader import AudioBatch, DataConfig, ShardStream, make_loader
from speechssl.data.shardset import ShardSet

__all__ = ["AudioBatch", "DataConfig", "ShardSet", "ShardStream", "make_loader"]
