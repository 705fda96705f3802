"""Client-side differential privacy with Flower's own functions (those its LocalDpMod
uses): clip the site's update (trained − global) to an L2 norm, then add Gaussian noise
with σ = sensitivity · √(2 ln(1.25/δ)) / ε to the weights that leave the site.

Flower's LocalDpMod itself expects the legacy Fit record layout (`fitins.*`), not the
message layout the strategies aggregate, so the same steps are applied here, inside the
site's reply, before it is signed."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_clip_model_update

from kaapana_assets.federated.hub import Privacy
from kaapana_assets.federation.channel import repeats


def noise_stdv(privacy: Privacy) -> float:
    return privacy.noise_stdv


def privatize(trained: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor],
              privacy: Privacy) -> dict[str, torch.Tensor]:
    # Each parameter once: nnU-Net names most of them several times, and counting copies would
    # spend the clipping norm on duplicates (and noise each copy differently).
    aliases = {k: v for k, v in repeats(trained).items() if torch.equal(start[k], start[v])}
    names = [k for k in trained if trained[k].is_floating_point() and k not in aliases]
    client = [trained[k].detach().cpu().double().numpy().copy() for k in names]
    server = [start[k].detach().cpu().double().numpy() for k in names]
    compute_clip_model_update(client, server, privacy.clipping_norm)  # in place: server + clipped update
    add_gaussian_noise_inplace(client, noise_stdv(privacy))
    out = dict(trained)
    for name, array in zip(names, client, strict=True):
        out[name] = torch.from_numpy(array).to(trained[name].dtype)
    for alias, name in aliases.items():
        out[alias] = out[name].clone()
    return out
