"""Network architectures, built by name from a plain-JSON config (what ``model.json`` stores).

``build_network(class_name, config)`` is the only way the model package creates a network, so a model
file is data (a state dict loaded with ``weights_only=True``) plus a name from this closed registry -
never pickled code.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from CMBDetectLib.errors import ModelError
from CMBDetectLib.networks.discriminator import StudentNet, TeacherNet
from CMBDetectLib.networks.unet import ShallowUNet

NETWORKS: dict[str, Callable[..., nn.Module]] = {
    "ShallowUNet": ShallowUNet,
    "TeacherNet": TeacherNet,
    "StudentNet": StudentNet,
}

__all__ = ["NETWORKS", "ShallowUNet", "StudentNet", "TeacherNet", "build_network", "count_parameters",
           "network_config"]


def build_network(class_name: str, config: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate a registered architecture; unknown names or options raise ``ModelError``."""
    if class_name not in NETWORKS:
        raise ModelError(f"unknown network architecture {class_name!r}; "
                         f"known: {', '.join(sorted(NETWORKS))}")
    config = dict(config or {})
    if "fc" in config:
        config["fc"] = tuple(config["fc"])  # JSON stores tuples as lists
    try:
        return NETWORKS[class_name](**config)
    except TypeError as error:
        raise ModelError(f"invalid configuration for {class_name}: {error}") from None


def network_config(network: nn.Module) -> dict[str, Any]:
    """The JSON-ready config that rebuilds ``network`` with :func:`build_network`."""
    return dict(getattr(network, "config", {}))


def count_parameters(network: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in network.parameters() if p.requires_grad or not trainable_only)
