"""Pose video: the ``pose`` task's stick figure walking, turning, and filmed by a panning camera;
the condition is its OpenPose-style skeleton in every frame.

A sample is ``frames`` frames (8 by default, 2 to :data:`MAX_FRAMES`) at the task's resolution
(32 or more):
``image`` (F, H, W, 3) and ``condition`` (F, H, W, 3) as uint8, ``meta["joints"]`` (F, 14, 2)
the joints' (x, y) in each frame. The motion of one clip:

* walk cycle: the legs lift in turn (thigh out, shin back) and the arms swing against them, at a
  random phase and 45 to 60 degrees of the cycle per frame;
* turning: the whole figure rotates from a slight lean at 3 to 6 degrees per frame, up to
  :data:`MAX_TURN` degrees;
* walking across: the figure moves sideways by up to 0.07 of its height per frame, up to
  :data:`MAX_ACROSS` heights;
* camera shift: the view pans over a larger background by up to :data:`MAX_PAN` of the canvas
  per frame (rounded to whole pixels), as far as its margin (:func:`camera_margin`) allows; the
  figure moves in the frame with it.

Frames are drawn with :class:`~lisa_control.data.tasks.pose.PoseTask`'s renderer (background,
clothes, joint markers, skeleton) and keep its colour rule, so its marker detector scores them.

Metrics (:meth:`PoseVideoTask.fidelity`) on generated videos (B, 3, F, H, W) in [-1, 1]:

* ``pck``: the pose task's PCK@0.2 on every frame, averaged over frames (every frame has all 14
  joints, so this is also the mean over all joints of all frames);
* ``temporal_consistency``: the fraction of (joint, consecutive frame pair) whose detected
  motion matches the motion of the joint's marker in the ground truth. For joint j between
  frames f and f+1, with p the detected positions and c the centres of the true markers (the
  joints on the pixel grid, as they are drawn: :func:`marker_centres`), the motion error is

      e = || (p[f+1, j] - p[f, j]) - (c[f+1, j] - c[f, j]) ||

  and the pair counts if j is detected in both frames and e <= max(1 px, MOTION_FRACTION * d),
  where d is the video's mean (over frames) bounding-box diagonal of the true joints. Ground
  truth scores exactly 1.0 (e = 0); noise and blank frames score 0, flickering markers and
  frames that stand still while the figure moves score low;
* ``motion_error``: mean e / d over the pairs detected in both frames (1.0 if there are none);
* ``detected`` and ``joint_error``: as the pose task's, over all frames.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from ...core.errors import ConfigError
from . import painting
from .base import ProceduralTask, TaskSample, to_pixels
from .pose import (
    ARMS,
    HEAD,
    LEGS,
    MARKER_TOLERANCE,
    MAX_POSE_TRIES,
    PoseTask,
    _direction,
    figure_style,
    limit_chroma,
    locate_markers,
    markers_apart,
    pck,
    turn,
)
from .registry import register_task

DEFAULT_FRAMES = 8
MAX_FRAMES = 16
MIN_RESOLUTION = 32
MOTION_FRACTION = 0.05
# Per-clip limits of the motion: degrees turned, sideways walk in figure heights, and camera
# speed in canvas widths per frame.
MAX_TURN, MAX_ACROSS, MAX_PAN = 45.0, 0.5, 0.03


def camera_margin(resolution: int) -> int:
    """Pixels of background on each side of the view that the camera can pan over: 16, less
    where the scene would pass 512 pixels (the renderer's largest canvas)."""
    return int(max(0, min(16, (512 - resolution) // 2)) // 4 * 4)


def marker_centres(joints: np.ndarray, size: int, resolution: int) -> np.ndarray:
    """Where the detector finds the markers of ``joints`` (..., 14, 2) in a clean render: the
    centres of the ``size``-pixel squares :meth:`PoseTask._draw_markers` paints."""
    corners = np.clip(np.rint(joints - (size - 1) / 2), 0, resolution - size)
    return corners + (size - 1) / 2


def walk_pose(phase: float, gait: dict) -> np.ndarray:
    """Joints (14, 2) of an upright figure of height 1, neck at the origin, at ``phase`` of its
    walk cycle: the right leg lifts while sin(phase) > 0, the left while it is < 0, and each arm
    swings against its own side's leg."""
    joints = np.zeros((14, 2))
    joints[HEAD] = (0.0, -0.16)
    swing = np.sin(phase)
    for side_name, side, sign in (("right", -1.0, 1.0), ("left", 1.0, -1.0)):
        lift = max(0.0, sign * swing)
        hip, knee, ankle = LEGS[side_name]
        thigh = gait["thigh"] + gait["stride"] * lift
        joints[hip] = (side * 0.085, 0.36)
        joints[knee] = joints[hip] + 0.23 * _direction(side, thigh)
        joints[ankle] = joints[knee] + 0.23 * _direction(side, thigh - gait["knee"] * lift)
        shoulder, elbow, wrist = ARMS[side_name]
        upper = gait["arm"] - gait["arm_swing"] * sign * swing
        joints[shoulder] = (side * 0.15, 0.03)
        joints[elbow] = joints[shoulder] + 0.16 * _direction(side, upper)
        joints[wrist] = joints[elbow] + 0.15 * _direction(side, upper + gait["elbow"])
    return joints


@register_task
class PoseVideoTask(ProceduralTask):
    """The moving stick figure of the module docstring, ``frames`` frames per sample."""

    name = "pose_video"
    metric_name = "pck"

    def __init__(self, resolution: int = 32, frames: int = DEFAULT_FRAMES):
        super().__init__(resolution)
        if self.resolution < MIN_RESOLUTION:
            raise ConfigError(
                f"pose_video needs a resolution of at least {MIN_RESOLUTION}, got "
                f"{self.resolution}: smaller, the markers of a moving figure overlap."
            )
        if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)):
            raise ConfigError(f"pose_video frames must be an integer, got {frames!r}.")
        if not 2 <= frames <= MAX_FRAMES:
            raise ConfigError(
                f"pose_video renders 2 to {MAX_FRAMES} frames per clip, got {frames}."
            )
        self.frames = int(frames)
        self.pose = PoseTask(self.resolution)  # the per-frame renderer and detector
        # The camera's view is a window of a larger background.
        self.scene = PoseTask(self.resolution + 2 * camera_margin(self.resolution))
        self.marker_size = self.pose.marker_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resolution={self.resolution}, frames={self.frames})"

    # ----------------------------------------------------------------------------- rendering

    def _motion(self, rng: np.random.Generator):
        """(figure shapes (F, 14, 2) of height ~1 incl. the walk across, body angles (F,),
        camera offsets (F, 2) in whole pixels, description words). Speeds are per frame, so
        longer clips move further, up to the totals of the module docstring."""
        f = self.frames
        gait = {
            "thigh": rng.uniform(3, 12),
            "stride": rng.uniform(25, 40),
            "knee": rng.uniform(25, 55),
            "arm": rng.uniform(20, 55),
            "arm_swing": rng.uniform(15, 35),
            "elbow": rng.uniform(10, 60),
        }
        t = np.arange(f)
        phases = rng.uniform(0, 2 * np.pi) + rng.uniform(np.pi / 4, np.pi / 3) * t
        lean = rng.uniform(-15, 15)
        turning = np.clip(rng.choice([-1, 1]) * rng.uniform(3, 6) * t, -MAX_TURN, MAX_TURN)
        across = np.clip(rng.uniform(-0.07, 0.07) * t, -MAX_ACROSS, MAX_ACROSS)
        shapes = np.stack(
            [turn(walk_pose(p, gait), lean + a) + np.array([x, 0.0])
             for p, a, x in zip(phases, turning, across)]
        )  # fmt: skip
        margin = camera_margin(self.resolution)
        pan = rng.uniform(-MAX_PAN, MAX_PAN, size=2) * self.resolution
        camera = np.clip(np.rint(pan[None] * t[:, None]), -margin, margin)
        words = []
        if abs(across[-1]) > 0.1:
            words.append("walking to the " + ("left" if across[-1] < 0 else "right"))
        else:
            words.append("walking on the spot")
        words.append("turning " + ("clockwise" if turning[-1] > 0 else "anticlockwise"))
        return shapes, lean + turning, camera, words

    def _place(self, rng: np.random.Generator, shapes: np.ndarray, camera: np.ndarray):
        """Joints in every frame (F, 14, 2): the clip's shapes scaled so that all frames'
        markers fit, placed where they fit, and seen from the moving camera."""
        r, m = self.resolution, self.marker_size
        span = (shapes.max((0, 1)) - shapes.min((0, 1))).max()
        # The camera shifts the figure in the frame too: leave room for that.
        reach = np.abs(camera).max(0).max()
        height = min(rng.uniform(*self.pose.height_range) * r, (r - 1 - 2 * m - reach) / span)
        world = shapes * height
        seen = world - camera[:, None]
        low, high = seen.min((0, 1)) - m, seen.max((0, 1)) + m
        offset = rng.uniform(-low, np.maximum(-low, r - 1 - high))
        return seen + offset, height

    def render(self, rng: np.random.Generator) -> TaskSample:
        r = self.resolution
        for _ in range(MAX_POSE_TRIES):
            shapes, angles, camera, words = self._motion(rng)
            joints, height = self._place(rng, shapes, camera)
            if all(markers_apart(frame, self.marker_size) for frame in joints):
                break
        colours, limb_width, head_radius, shirt, trousers = figure_style(rng, height)
        scene = painting.to_uint8(limit_chroma(self.scene._background(rng)))

        images, conditions = [], []
        for frame_joints, (cx, cy) in zip(joints, camera.astype(int)):
            margin = camera_margin(r)
            x0, y0 = margin + cx, margin + cy
            canvas = Image.fromarray(np.ascontiguousarray(scene[y0 : y0 + r, x0 : x0 + r]))
            self.pose._draw_figure(
                ImageDraw.Draw(canvas), frame_joints, colours, limb_width, head_radius
            )
            image = np.array(canvas)
            self.pose._draw_markers(image, frame_joints)
            images.append(image)
            conditions.append(self.pose._skeleton(frame_joints))
        caption = (
            f"a person in {painting.a(shirt)} shirt and {trousers} trousers {', '.join(words)}"
        )
        return TaskSample(
            np.stack(images),
            np.stack(conditions),
            caption,
            {"joints": joints, "camera": camera, "angles": angles},
        )

    # ----------------------------------------------------------------------------- metrics

    def _frames(self, videos: torch.Tensor) -> np.ndarray:
        """Videos (B, 3, F, H, W) in [-1, 1] -> frames (B*F, H, W, 3) on the 0..255 scale."""
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ConfigError(
                f"expected videos of shape (B, 3, F, H, W), got {tuple(videos.shape)}."
            )
        b, c, f, h, w = videos.shape
        return to_pixels(videos.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w))

    def fidelity(self, generated: torch.Tensor, samples: list[TaskSample]) -> dict[str, float]:
        """``pck``, ``temporal_consistency``, ``motion_error``, ``detected`` and
        ``joint_error`` as the module docstring defines them."""
        pixels = self._frames(generated)
        b, f = generated.shape[0], generated.shape[2]
        if len(samples) != b:
            raise ConfigError(
                f"got {b} generated videos but {len(samples)} task samples; pass the samples "
                "whose conditions produced the videos, in the same order."
            )
        truth = np.stack([s.meta["joints"] for s in samples])  # (B, F', 14, 2)
        if truth.shape[1] != f or pixels.shape[1:3] != samples[0].image.shape[1:3]:
            raise ConfigError(
                f"generated videos are {f} frames of {pixels.shape[1]}x{pixels.shape[2]} but "
                f"the task renders {truth.shape[1]} frames of {samples[0].image.shape[1]}x"
                f"{samples[0].image.shape[2]}; generate at the task's size and length."
            )
        found, distance = locate_markers(pixels, self.marker_size)
        flat_truth = truth.reshape(b * f, *truth.shape[2:])
        correct = pck(found, distance, flat_truth)
        detected = distance < MARKER_TOLERANCE
        diagonal = np.linalg.norm(flat_truth.max(1) - flat_truth.min(1), axis=-1)  # (B*F,)
        relative_error = np.linalg.norm(found - flat_truth, axis=-1) / diagonal[:, None]

        found, detected_v = found.reshape(truth.shape), detected.reshape(b, f, -1)
        video_diagonal = diagonal.reshape(b, f).mean(1)[:, None, None]  # (B, 1, 1)
        centres = marker_centres(truth, self.marker_size, self.resolution)
        motion = np.linalg.norm(np.diff(found, axis=1) - np.diff(centres, axis=1), axis=-1)
        both = detected_v[:, 1:] & detected_v[:, :-1]  # (B, F-1, 14)
        tolerance = np.maximum(1.0, MOTION_FRACTION * video_diagonal)
        consistent = both & (motion <= tolerance + 1e-9)
        relative_motion = motion / video_diagonal
        return {
            "pck": float(correct.mean()),
            "temporal_consistency": float(consistent.mean()),
            "motion_error": float(relative_motion[both].mean()) if both.any() else 1.0,
            "detected": float(detected.mean()),
            "joint_error": float(relative_error[detected].mean()) if detected.any() else 1.0,
        }

    def realism(self, videos: torch.Tensor) -> float:
        """The pose task's realism over all frames: the mean fraction of the 14 marker colours
        present as a solid marker-sized patch."""
        _, distance = locate_markers(self._frames(videos), self.marker_size)
        return float((distance < MARKER_TOLERANCE).mean())
