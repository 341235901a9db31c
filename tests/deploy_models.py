"""Factories for CLI deployment tests (`moh-compile tests.deploy_models:NAME`): tiny models + inputs."""
from __future__ import annotations

import torch

from tests.models import build


def tel_layer():
    model, inputs, _, _ = build("tel_layer")
    return model, inputs


def tel_layer_other():
    """Same architecture, other weights (a wrong reference for verify)."""
    model, inputs, _, _ = build("tel_layer")
    torch.manual_seed(123)
    for p in model.parameters():
        p.data = torch.randn_like(p) * 0.1
    return model, inputs


def bert():
    model, inputs, _, _ = build("bert")
    return model, inputs
