"""SyntheticConfig: what the synthetic data set holds (training/synthetic.py writes it; synthetic_video.py
plans its clips from the video fields)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SyntheticConfig:
    num_images: int = 4000
    num_videos: int = 120  # training clips written to train.jsonl (a stage can also render them: RenderedVideos)
    heldout_fraction: float = 0.1  # of the images
    seed: int = 0
    num_frames: int = 16  # frames written per video file
    video_size: tuple[int, int] = (160, 120)
    num_time_tokens: int = 8
    time_token_format: str = "<t{t}>"
    # held-out clips (heldout.jsonl), tasks in turn: 250 = 50 questions a task
    num_heldout_videos: int = 250
    sampled_frames: int = 8  # frames the model samples from a clip (the preset's video.num_frames)
    pooled_frames: int = 2  # frames TSP averages into one group (the preset's pool t): events last whole groups
    fps: float = 8.0
