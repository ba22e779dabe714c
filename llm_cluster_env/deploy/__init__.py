"""Deployment: the exported router's runtime (numpy + onnxruntime), the feature catalog and serving adapters. Imports nothing from the simulator or the training side."""
