"""Detector families: head, anchors, assignment, loss and post-processing (RetinaNet), and the adapter for your own."""
