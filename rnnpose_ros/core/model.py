"""The RNNPose module tree whose state_dict maps one-to-one onto the published ``.tckpt`` keys.

Our sub-modules keep the published internals (so every key below a prefix is identical) and only
the prefixes are shorter:

=============================================  ==================
published key prefix                           ours
=============================================  ==================
``hybrid_desc_net.corr_fea_extractor_2d.``     ``desc2d.``
``hybrid_desc_net.corr_fea_extractor_3d.``     ``desc3d.``
``ctx_fea_net.context_fea_extractor_3d.``      ``ctx3d.``
``motion_net.image_fea_enc.fnet.``             ``fnet.``
``motion_net.cf_net.update_block.``            ``update_block.``
``motion_net.sigma.0``                         ``sigma``
``global_step``                                (dropped: a training counter)
=============================================  ==================
"""

from __future__ import annotations

import torch
from torch import nn

from .nets.desc2d import Desc2DNet
from .nets.kpconv import KPConvFeatureNet
from .nets.raft import BasicEncoder, BasicUpdateBlock

PUBLISHED_PREFIXES: tuple[tuple[str, str], ...] = (
    ("hybrid_desc_net.corr_fea_extractor_2d.", "desc2d."),
    ("hybrid_desc_net.corr_fea_extractor_3d.", "desc3d."),
    ("ctx_fea_net.context_fea_extractor_3d.", "ctx3d."),
    ("motion_net.image_fea_enc.fnet.", "fnet."),
    ("motion_net.cf_net.update_block.", "update_block."),
    ("motion_net.sigma.0", "sigma"),
)
IGNORED_PUBLISHED_KEYS: frozenset[str] = frozenset({"global_step"})

DESCRIPTOR_DIM = 32
CONTEXT_DIM = 256


class RNNPoseNet(nn.Module):
    """All learned parts of RNNPose for one object (the published code trains one model per object).

    ``sigma`` (1,) is the temperature of the descriptor confidence weight exp(−|1 − s|/σ).
    """

    def __init__(self) -> None:
        super().__init__()
        self.desc2d = Desc2DNet(descriptor_dim=DESCRIPTOR_DIM, normalize_output=True)
        self.desc3d = KPConvFeatureNet(DESCRIPTOR_DIM, normalize=True)
        self.ctx3d = KPConvFeatureNet(CONTEXT_DIM, normalize=False)
        self.fnet = BasicEncoder(output_dim=256)
        self.update_block = BasicUpdateBlock()
        self.sigma = nn.Parameter(torch.ones(1))


def published_to_ours(key: str) -> str | None:
    """Map a published checkpoint key to ours; ``None`` for keys we deliberately drop."""
    if key in IGNORED_PUBLISHED_KEYS:
        return None
    for published, ours in PUBLISHED_PREFIXES:
        if key == published or (published.endswith(".") and key.startswith(published)):
            return ours + key[len(published) :]
    raise KeyError(key)


def ours_to_published(key: str) -> str:
    """Inverse of :func:`published_to_ours` (for writing published-layout files)."""
    for published, ours in PUBLISHED_PREFIXES:
        if key == ours or (ours.endswith(".") and key.startswith(ours)):
            return published + key[len(ours) :]
    raise KeyError(key)
