"""``python -m peftc`` is the ``peftc`` command."""

from .cli import main

main()
