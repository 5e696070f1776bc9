"""The built-in methods, one room each (the HF PEFT ``tuners/<method>/`` idea): a method is a YAML file in
``specs/`` plus the Python here — its blocks and, where it has them, its primitive, training stages, deploy mode,
task selection and distillation. Importing this package registers them all (:mod:`peftc.plugins` does, on the
first registry lookup); nothing outside this package names a method.

BitFit and the linear probe need no Python: their specs compose generic primitives only.
"""

from peftc.methods import (  # noqa: F401  (registration)
    adaptformer,
    clr,
    confit,
    convpass,
    er_ace,
    fact,
    generative_ocl,
    ln_tuning,
    lora,
    memvp,
    replacement,
    taer,
    tocom,
    tome,
    vera,
)
