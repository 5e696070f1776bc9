"""``python -m peftc`` is the ``peftc`` command."""

from peftc.launch import main

main()
