"""Pose on segments: a stick figure (the ``pose`` task's) in front of a segmented, textured
background (the ``segmentation`` task's classes). Every image carries two conditions at once:

* ``pose``: the figure's OpenPose-style skeleton, scored by PCK@0.2 of the joint markers found in
  a generated image (as the ``pose`` task scores);
* ``segmentation``: the background's class map, scored by the mIoU of the generated background
  *outside the figure* (figure and marker pixels are left out of both maps).

The segmentation map covers the whole canvas (the layout behind the figure too), so the two
conditions say different things: one where the figure is and how it stands, the other what lies
behind it. A side network trained on one of them leaves the other part of the image to the main
network; composing the two networks should give both.

Colours: the background's textures are moved towards grey until their chroma (max - min channel)
is at most the pose task's ``MAX_SCENE_CHROMA``, so the pose metric's guarantee holds (every scene
colour stays far from every marker colour); the classes are then told apart by the nearest of
their likewise limited prototype colours.

Conditions: ``get_task("pose_segmentation")`` renders both; a sample's ``condition`` is then a
mapping ``{"pose": ..., "segmentation": ...}`` and the trainer builds one side network per
condition. ``get_task("pose_segmentation", conditions=("pose",))`` (``lisa train --task
pose_segmentation --conditioning_image_column pose``) is the single-condition view: the same
images, the one condition as an array. Every view reports both metrics; its ``metric_name`` is
``pck`` for the pose view, ``miou`` for the segmentation view and ``fidelity`` (their mean) for
both.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from ...core.errors import ConfigError
from . import painting
from .base import ProceduralTask, TaskSample, check_batch, to_pixels
from .pose import (
    MAX_POSE_TRIES,
    PoseTask,
    figure_style,
    limit_chroma,
    markers_apart,
    random_body_angle,
    random_pose,
    turn,
)
from .registry import register_task
from .segmentation import CLASSES, PALETTE, PROTOTYPES, REJECT_DISTANCE, SegmentationTask, mean_iou

# Label of figure and marker pixels in the segmentation target: left out of the mIoU.
FIGURE = -2
UNKNOWN = -1
LIMITED_PROTOTYPES = limit_chroma(PROTOTYPES)


def classify(pixels: np.ndarray) -> np.ndarray:
    """Class labels (..., H, W) of colours (..., H, W, 3): the nearest chroma-limited class
    prototype, or ``UNKNOWN`` where even that is more than ``REJECT_DISTANCE`` away."""
    distance = np.linalg.norm(pixels[..., None, :] - LIMITED_PROTOTYPES, axis=-1)
    labels = distance.argmin(axis=-1)
    return np.where(distance.min(axis=-1) <= REJECT_DISTANCE, labels, UNKNOWN)


@register_task
class PoseSegmentationTask(ProceduralTask):
    name = "pose_segmentation"
    condition_names = ("pose", "segmentation")
    metric_name = "fidelity"
    num_classes = len(CLASSES)

    def __init__(self, resolution: int = 32, conditions=None):
        super().__init__(resolution)
        conditions = tuple(self.condition_names if conditions is None else conditions)
        unknown = [c for c in conditions if c not in self.condition_names]
        if not conditions or unknown or len(set(conditions)) != len(conditions):
            raise ConfigError(
                f"the {self.name} task renders the conditions {', '.join(self.condition_names)}; "
                f"pick one or both, once each (got {', '.join(conditions) or 'none'})."
            )
        self.conditions = conditions
        self.metric_name = {("pose",): "pck", ("segmentation",): "miou"}.get(conditions, "fidelity")
        self._pose = PoseTask(self.resolution)
        self._segments = SegmentationTask(self.resolution)

    def with_conditions(self, conditions) -> PoseSegmentationTask:
        """The view of this task that carries ``conditions`` (the same images)."""
        return type(self)(self.resolution, conditions)

    # ----------------------------------------------------------------------------- rendering

    def render(self, rng: np.random.Generator) -> TaskSample:
        background, labels, words = self._background(rng)
        joints, angle, upright, height = self._place_figure(rng)
        colours, limb_width, head_radius, shirt, trousers = figure_style(rng, height)

        canvas = Image.fromarray(painting.to_uint8(limit_chroma(background)))
        self._pose._draw_figure(ImageDraw.Draw(canvas), joints, colours, limb_width, head_radius)
        image = np.array(canvas)
        self._pose._draw_markers(image, joints)
        figure = self._figure_mask(joints, limb_width, head_radius)

        target = np.where(figure, FIGURE, labels)
        conditions = {"pose": self._pose._skeleton(joints), "segmentation": PALETTE[labels]}
        chosen = {name: conditions[name] for name in self.conditions}
        condition = chosen[self.conditions[0]] if len(chosen) == 1 else chosen
        caption = (
            f"a person in {painting.a(shirt)} shirt and {trousers} trousers"
            f"{self._pose._posture(angle)}{self._pose._gesture(upright)} in front of "
            f"{painting.enumerate_words(words)} on grey"
        )
        meta = {"joints": joints, "labels": target, "conditions": conditions}
        return TaskSample(image, condition, caption, meta)

    def _background(self, rng: np.random.Generator):
        """The segmentation task's scene (float colours), its class map and caption words."""
        r = self.resolution
        segments = self._segments
        image = segments._paint(rng, CLASSES[0])
        labels = np.zeros((r, r), dtype=np.int64)
        words = []
        for c in rng.permutation(np.arange(1, len(CLASSES)))[: int(rng.integers(2, 4))]:
            kind, mask = painting.random_shape(rng, r, 0.2 * r, 0.35 * r)
            image = np.where(mask[..., None], segments._paint(rng, CLASSES[c]), image)
            labels[mask] = c
            words.append(painting.a(f"{CLASSES[c].name} {kind}"))
        return image, labels, words

    def _place_figure(self, rng: np.random.Generator):
        """Joints (14, 2) of a figure that fits the canvas with its markers apart, as the pose
        task places them."""
        r, m = self.resolution, self._pose.marker_size
        for _ in range(MAX_POSE_TRIES):
            upright = random_pose(rng)
            angle = random_body_angle(rng)
            shape = turn(upright, angle)
            span = (shape.max(0) - shape.min(0)).max()
            height = min(rng.uniform(*self._pose.height_range) * r, (r - 1 - 2 * m) / span)
            joints = shape * height
            low, high = joints.min(0) - m, joints.max(0) + m
            joints = joints + rng.uniform(-low, np.maximum(-low, r - 1 - high))
            if markers_apart(joints, m):
                break
        return joints, angle, upright, height

    def _figure_mask(self, joints, limb_width, head_radius) -> np.ndarray:
        """Pixels of the figure and its markers, grown by one pixel (anti-aliased edges)."""
        r, m = self.resolution, self._pose.marker_size
        canvas = Image.new("L", (r, r), 0)
        solid = {"shirt": 255, "trousers": 255, "skin": 255}
        self._pose._draw_figure(ImageDraw.Draw(canvas), joints, solid, limb_width, head_radius)
        mask = np.array(canvas) > 0
        corners = np.rint(joints - (m - 1) / 2).astype(int).clip(0, r - m)
        for x, y in corners:
            mask[y : y + m, x : x + m] = True
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        return grown

    # ----------------------------------------------------------------------------- metrics

    def fidelity(self, generated: torch.Tensor, samples: list[TaskSample]) -> dict[str, float]:
        """The pose task's ``pck``, ``detected`` and ``joint_error`` for the figure; ``miou``
        and ``pixel_accuracy`` of the background outside the figure; ``fidelity``, the mean of
        ``pck`` and ``miou``."""
        pixels = to_pixels(generated)
        check_batch(pixels, samples)
        scores = self._pose.fidelity(generated, samples)
        target = np.stack([s.meta["labels"] for s in samples])
        predicted = np.where(target == FIGURE, FIGURE, classify(pixels))
        outside = target != FIGURE
        scores["miou"] = float(mean_iou(predicted, target, self.num_classes).mean())
        scores["pixel_accuracy"] = float((predicted == target)[outside].mean())
        scores["fidelity"] = (scores["pck"] + scores["miou"]) / 2
        return scores

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resolution={self.resolution}, conditions={self.conditions})"
