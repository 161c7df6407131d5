"""The Llama 4 model: text decoder (iRoPE attention, MoE) built from the config and the parametrization."""
