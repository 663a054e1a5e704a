"""Synthetic lung-ultrasound phantom with pixel-exact masks: the only training source."""

from workers.training.phantom.scanner import Cine, Sample, make_cine, make_sample
from workers.training.phantom.scene import SCENARIOS, Scene, random_scene, render

__all__ = ["SCENARIOS", "Cine", "Sample", "Scene", "make_cine", "make_sample", "random_scene", "render"]
