"""The paper's figures: A1 (detections above gradient maps, per image) and A2 (area curves)."""
