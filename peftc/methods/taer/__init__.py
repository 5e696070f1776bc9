"""TaER — task-aware experience replay: the ``taer`` training head (replay memory, incremental classifier) and
its task-free reading as the ``taer`` online learner."""

from peftc.methods.taer import head, online  # noqa: F401  (registration)
