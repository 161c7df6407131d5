"""MetaP: every scale-dependent number of the model (init stds, multipliers, LR multipliers)."""

from maxllama.metap.parametrization import Parametrization, Role, parametrization_for

__all__ = ["Parametrization", "Role", "parametrization_for"]
