"""Important regions: pixels whose gradient magnitude exceeds a threshold, and their mean area per threshold."""
