"""Triton kernels for the GPU path of the engine, each beside the torch reference it must match.

Tested on CPU under Triton's interpreter (`TRITON_INTERPRET=1`, tests/engine/test_triton_kernels.py)
on small shapes, and compiled on a GPU by deploy/gpu/check.sh. On a GPU the engine calls the paged
decode attention and the packed prefill attention (shared/engine/model.py); the RMSNorm, RoPE and
K/V-store kernels are not called yet (torch's ops run there).
"""
