"""ER-ACE (Caccia et al. 2022; Mammoth ``models/er_ace.py``): an online learner, the replay baseline nearest TaER."""

from peftc.methods.er_ace import er_ace  # noqa: F401  (registration)
