"""What a checkpoint is and how an image becomes its input.

The model factory, the checkpoint format, preprocessing, image decoding and ONNX export.
"""
