"""Data: corpora, tokenizers, packing into fixed-length sequences, and the Grain pipeline."""
