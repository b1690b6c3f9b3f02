"""CUDA-only tests: what no CPU run can show (FSDP2's CUDA copy-in, bitsandbytes' CUDA kernels, NCCL).

Every test here is skipped without a GPU, so `make test` on a CPU machine collects and skips them; on a GPU machine
bench/gpu_bench.sh runs this file first (`python3 -m pytest -q -rs tests/test_gpu.py`). NF4 tests also need
bitsandbytes (skipped without it).
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
