"""Triton kernels for the GPU path of the engine, each beside the torch reference it must match.

Tested on CPU under Triton's interpreter (`TRITON_INTERPRET=1`, tests/engine/test_triton_kernels.py)
on small shapes, and compiled on a GPU by deploy/gpu/check.sh. On a GPU the engine calls all of them
(shared/engine/model.py): the paged decode attention, the packed prefill attention for batches of fresh
prompts, and RMSNorm (fused with the residual add before it), RoPE and the K/V store in every step.
"""
