"""Hugging Face interop: safetensors I/O, config and weight-name mapping, import and export."""

from maxllama.base.errors import UserError


class InteropError(UserError, ValueError):
    """A checkpoint or config that cannot be mapped; the message names the tensor or field."""
