"""Checkpoint formats: gradlens' own, torchvision, mmdetection 2.x and 3.x, detectron2; config text read as data."""
