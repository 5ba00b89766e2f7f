"""tritonjac: outputs and per-point Jacobians of point-wise MLPs from one fused pass."""

from .activations import Activation, Sine
from .encoding import PositionalEncoding
from .functional import mlp_jacobian
from .module import JacobianMLP, jacobian

__all__ = ["JacobianMLP", "PositionalEncoding", "Sine", "Activation", "jacobian", "mlp_jacobian"]
__version__ = "0.1.0"
