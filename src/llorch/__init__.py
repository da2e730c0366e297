"""llorch: GPT-2 inference in FP32 on the CPU."""

__version__ = "0.1.0"
