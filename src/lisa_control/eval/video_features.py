"""The features of the task-feature video Fréchet distance: per-frame features and how they
change from frame to frame.

A :class:`TaskVideoFeatureNetwork` runs a frame network (the image
:class:`~lisa_control.eval.feature_distance.TaskFeatureNetwork`, trained on the frames of the
task's clips) on every frame of a video and pools, over the frames,

* the frame features ``phi_f`` (what the frames show),
* their speed ``|phi_{f+1} - phi_f|`` (how much consecutive frames differ), and
* their acceleration ``|phi_{f+2} - 2 phi_{f+1} + phi_f|`` (how smoothly they change),

each averaged over frames, concatenated to 3 x D features. Real clips move smoothly: small,
steady changes. Shuffled frames give the same frame features but larger speed and far larger
acceleration, flickering frames likewise, and a video that stands still has none, so temporal
incoherence moves the video's features away from the real clips' even when every frame on its
own looks real. This is **not** FVD (no I3D network): numbers compare only between runs with the
same task, resolution, frame count, feature seed and number of samples.
"""

from __future__ import annotations

import torch
from torch import nn


def to_frames(videos: torch.Tensor) -> torch.Tensor:
    """Videos (N, C, F, H, W) -> their frames (N*F, C, H, W), video by video."""
    n, c, f, h, w = videos.shape
    return videos.transpose(1, 2).reshape(n * f, c, h, w)


class TaskVideoFeatureNetwork(nn.Module):
    """``frame_network`` (anything with ``features(images) -> (N, D)``) on every frame, pooled
    over frames as the module docstring says: features (N, 3 * D) of videos (N, 3, F, H, W).
    Clips of fewer than 3 frames have zero acceleration (and of 1 frame zero speed)."""

    def __init__(self, frame_network: nn.Module):
        super().__init__()
        self.frame_network = frame_network

    def features(self, videos: torch.Tensor) -> torch.Tensor:
        n, f = videos.shape[0], videos.shape[2]
        maps = self.frame_network.feature_maps(to_frames(videos))
        maps = maps.reshape(n, f, *maps.shape[1:])  # (N, F, D, h, w)
        pooled = [maps.mean(dim=(1, 3, 4))]
        for order in (1, 2):
            if f > order:
                pooled.append(maps.diff(n=order, dim=1).abs().mean(dim=(1, 3, 4)))
            else:
                pooled.append(torch.zeros_like(pooled[0]))
        return torch.cat(pooled, dim=1)
