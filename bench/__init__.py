"""Benchmarks: speed and memory ratios against stock ComfyUI, and edit quality on the toy world."""
