"""Each framework's test-time preprocessing: resize (OpenCV's and Pillow's uint8 bilinear, bit-exact), normalise, pad."""
