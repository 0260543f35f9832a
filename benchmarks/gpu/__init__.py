"""Issue 16's device check: gradients, ResNet-101 speed, AmoebaNet-D memory, orchestration efficiency.

``python -m benchmarks.gpu --out DIR`` on a CUDA machine (``--cpu-dry-run``
runs the same code at tiny sizes on the CPU). ``scripts/gpu_check.sh`` wraps
it with the installation and the CUDA test runs; docs/guide/gpu-check.md ("Checking on
a GPU") says how a session with a device calls it.
"""
