"""Sampling math for SD3 as ComfyUI does it (see the project's sampling spec): pure tensor and float code."""
