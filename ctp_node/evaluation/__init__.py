"""Evaluation of candidate series against the truth: image and perfusion-map agreement."""
