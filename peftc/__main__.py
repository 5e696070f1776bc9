"""``python -m peftc`` is the ``peftc`` command."""

from peftc.cli import main

main()
