"""ER-ACE (Caccia et al. 2022; Mammoth ``models/er_ace.py``): an online learner, the replay baseline nearest TaER."""

from peftc.plugins import implemented_in

implemented_in(f"{__name__}.er_ace")
