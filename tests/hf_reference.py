"""What Hugging Face's reference models compute, where their own entry points cannot be called as they are."""

import numpy as np
import torch


def hf_multimodal_logits(model, tokens: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """What Llama4ForConditionalGeneration.forward computes, step by step: its forward raises in some releases
    (5.24.0 on every call, reading `image_outputs` from the text model's output). `pixels` are the tiles of
    every row in order, [tiles, 3, H, W]; their features replace the embeddings of the image tokens in order."""
    with torch.no_grad():
        ids = torch.tensor(tokens)
        embeds = model.get_input_embeddings()(ids)
        features = model.vision_model(torch.from_numpy(pixels)).last_hidden_state
        projected = model.multi_modal_projector(features.reshape(-1, features.shape[-1]))
        embeds = embeds.masked_scatter((ids == model.config.image_token_id)[..., None], projected)
        return model.language_model(inputs_embeds=embeds).logits.numpy()
