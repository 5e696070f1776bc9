"""The language: spec schema, recipe schema, IR, loader, predicates, error translation, the primitive registry."""

from peftc.language.ir import MethodSpec, Rule
from peftc.language.loader import builtin_specs, iter_builtin_summaries, load_spec, parse_overrides
from peftc.language.primitives import Primitive, get_primitive, primitive_names, register_primitive
from peftc.language.recipe import OptimizerArgs, Phase, ReplayArgs, SchedulerArgs, StageDecl, TrainSection
from peftc.language.schema import BlockRuleArgs, ParamDecl, RuleArgs, Selector, TaskState, TensorArgs

__all__ = ["BlockRuleArgs", "MethodSpec", "OptimizerArgs", "ParamDecl", "Phase", "Primitive", "ReplayArgs", "Rule",
           "RuleArgs", "SchedulerArgs", "Selector", "StageDecl", "TaskState", "TensorArgs", "TrainSection",
           "builtin_specs", "get_primitive", "iter_builtin_summaries", "load_spec", "parse_overrides",
           "primitive_names", "register_primitive"]
