"""Export: ONNX graph, deployment schema and the stock-SB3 loading bundle."""
