"""Private torch helpers that keep the non-interference invariants in one place.

Every callback and method goes through these guards instead of re-implementing them:

* :func:`eval_mode` saves and restores the ``training`` flag of every submodule.
* :func:`gradients_on` leaves ``torch.inference_mode`` (Lightning validation hooks) and autocast.
* :func:`hooks` removes every registered hook in ``finally``.
* :func:`fork_global_rng` keeps the global torch RNG (CPU and CUDA) untouched.
* :func:`resolve_layers` / :func:`get_layer` turn dotted names into modules, with close-match errors.
"""

from lightning_introspect._torch.guards import (
    eval_mode,
    fork_global_rng,
    fresh_input,
    gradients_on,
    introspection_mode,
    module_device,
    private_generator,
)
from lightning_introspect._torch.hooks import hooks, record_execution_order
from lightning_introspect._torch.layers import get_layer, resolve_layers

__all__ = [
    "eval_mode",
    "fork_global_rng",
    "fresh_input",
    "get_layer",
    "gradients_on",
    "hooks",
    "introspection_mode",
    "module_device",
    "private_generator",
    "record_execution_order",
    "resolve_layers",
]
