"""Detection quality per object and per image (DESIGN.md, "Object quality" and "Image quality")."""

from gradlens.scoring.iou import paired_iou
from gradlens.scoring.quality import QualityScores, quality_scores

__all__ = ["QualityScores", "paired_iou", "quality_scores"]
