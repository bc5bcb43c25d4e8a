"""Deployment: a trained checkpoint leaves Python as an ONNX file (fp32 or int8) that says what it is."""
