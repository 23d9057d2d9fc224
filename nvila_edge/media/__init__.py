"""Media handling shared by the torch model and the runtime: numpy / PIL / OpenCV only."""

from .image import load_image, to_pixel_values
from .tiling import ImagePlan, ScaleGrid, closest_grid, plan_image
from .video import VideoClip, VideoPlan, load_video, plan_video, sample_frame_indices, time_token_index

__all__ = [
    "load_image",
    "to_pixel_values",
    "ImagePlan",
    "ScaleGrid",
    "closest_grid",
    "plan_image",
    "VideoClip",
    "VideoPlan",
    "load_video",
    "plan_video",
    "sample_frame_indices",
    "time_token_index",
]
