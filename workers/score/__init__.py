"""Class maps -> lung-ultrasound findings and Soldati scores (pure numpy)."""

from workers.score.lus import GridSpacing, ScoreConfig, frame_findings, video_findings

__all__ = ["GridSpacing", "ScoreConfig", "frame_findings", "video_findings"]
