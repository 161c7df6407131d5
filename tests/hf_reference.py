"""What Hugging Face's reference models compute, called as users call them."""

import numpy as np
import torch


def hf_multimodal_logits(model, tokens: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Llama4ForConditionalGeneration's own forward. `pixels` are the tiles of every row in order, [tiles, 3, H, W];
    their features replace the embeddings of the image tokens in order. (Its forward raises in transformers
    5.24.0, reading `image_outputs` from the text model's output; the parity extra pins 5.23.)"""
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), pixel_values=torch.from_numpy(pixels)).logits.numpy()
