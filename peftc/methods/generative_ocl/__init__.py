"""The online generative classifier (arXiv 2205.09347): Multi-Similarity training, nearest-class-mean prediction."""

from peftc.methods.generative_ocl import learner  # noqa: F401  (registration)
