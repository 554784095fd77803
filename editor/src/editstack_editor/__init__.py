"""The editstack editing service: loads a diffusers image-edit pipeline and serves edit batches."""
