"""ctp-node: a DICOM node that inpaints sparsely sampled CT perfusion series to 1 s."""

__version__ = "0.1.0"
