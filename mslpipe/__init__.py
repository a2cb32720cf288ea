"""mslpipe: a self-configuring pipeline for MS lesion segmentation on brain FLAIR MRI."""

__version__ = "0.1.0"
