"""TaER — task-aware experience replay: the ``taer`` training head (replay memory, incremental classifier)."""

from peftc.methods.taer import head  # noqa: F401  (registration)
