"""TaER — task-aware experience replay: the ``taer`` training head (replay memory, incremental classifier) and
its task-free reading as the ``taer`` online learner."""

from peftc.plugins import implemented_in

implemented_in(f"{__name__}.head", f"{__name__}.online")
