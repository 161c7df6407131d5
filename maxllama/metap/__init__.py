"""MetaP: every scale-dependent number of the model (init stds, multipliers, per-parameter LR, weight decay
and Adam eps), from the rules table of docs/metap.md and the ratios of this run to the proxy it was tuned on."""

from maxllama.metap.rules import ROLES, Parametrization, ParamRule, Role, Scales, param_rule, parametrization_for, run_scales

__all__ = ["ROLES", "Parametrization", "ParamRule", "Role", "Scales", "param_rule", "parametrization_for", "run_scales"]
