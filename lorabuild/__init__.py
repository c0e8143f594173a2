"""lorabuild: train Stable Diffusion LoRA adapters as an incremental doit build."""

__version__ = "0.1.0"
