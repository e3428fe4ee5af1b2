"""Assembling the Beam job: options, the model registry and the pipeline graph."""
