"""The online generative classifier (arXiv 2205.09347): Multi-Similarity training, nearest-class-mean prediction."""

from peftc.plugins import implemented_in

implemented_in(f"{__name__}.learner")
