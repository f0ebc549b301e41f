"""Triton kernels for the GPU path of the engine, each beside the torch reference it must match.

Tested on CPU under Triton's interpreter (`TRITON_INTERPRET=1`, tests/engine/test_triton_kernels.py)
on small shapes, and on a GPU when one is lent. Not yet called by the engine: CUDA execution (weights,
cache and steps on the device) is the part of the GPU issue still to come.
"""
