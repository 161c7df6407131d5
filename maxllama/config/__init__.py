"""Typed, validated run configuration loaded from YAML."""

from maxllama.config.loader import ConfigError, dump_config, load_config, resolved_origins
from maxllama.config.schema import Config, ModelConfig

__all__ = ["Config", "ConfigError", "ModelConfig", "dump_config", "load_config", "resolved_origins"]
