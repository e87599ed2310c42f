"""Make a trained network small and fast to deploy: ONNX export, int8 quantization, Huffman coding."""
