"""GPU suite: runs only where CUDA is available (see conftest.py); benchmarks/gpu_check.sh drives it."""
