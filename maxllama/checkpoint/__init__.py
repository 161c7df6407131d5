"""Checkpoints: Orbax save/restore of the train state and the resume policy."""
