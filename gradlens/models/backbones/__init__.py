"""Backbones (and the Table A1 ImageNet classifiers), with the official parameter names."""
