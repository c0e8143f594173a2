"""doit entry point: lorabuild's stages for every project in projects/.

    doit list            the task groups
    doit train:demo      build everything the demo LoRA needs
    doit sample:demo     ... and render its sample images
"""
from pathlib import Path

from lorabuild.tasks import doit_config, make_task_creators

DOIT_CONFIG = doit_config(Path(__file__).resolve().parent)
globals().update(make_task_creators(Path(__file__).resolve().parent))
