"""Hugging Face interop: safetensors I/O, config and weight-name mapping, import and export."""


class InteropError(ValueError):
    """A checkpoint or config that cannot be mapped; the message names the tensor or field."""
