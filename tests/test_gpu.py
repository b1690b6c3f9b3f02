"""CUDA-only tests: what no CPU run can show (FSDP2's CUDA copy-in, bitsandbytes' CUDA kernels, NCCL).

Every test here is skipped without a GPU, so `make test` on a CPU machine collects and skips them; on a GPU machine
bench/gpu_bench.sh runs this file first (`python3 -m pytest -q -rs tests/test_gpu.py`). NF4 tests also need
bitsandbytes (skipped without it).
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _one_rank_group():
    """A process group of one (FSDP2 needs a mesh even at world size 1), as init_distributed would start it."""
    import socket

    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("cpu:gloo,cuda:nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                device_id=torch.device("cuda", 0))


def test_nf4_under_fsdp2_equals_unsharded(tiny_qwen2):
    """Issue 20 item 4: an NF4 model sharded with FSDP2 at world size 1 on CUDA (its all-gather copy-in goes through
    float for floating dtypes) gives the same packed codes and the same pair_logps as the unsharded model."""
    pytest.importorskip("bitsandbytes")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from stages.data.encode import Encoded
    from stages.model.distributed import DistEnv, decoder_layers
    from stages.model.loading import materialize
    from stages.model.logprobs import pair_logps
    from stages.model.models import ModelSpec, _meta_base, load_model

    cuda = torch.device("cuda", 0)
    spec = ModelSpec(str(tiny_qwen2), "bf16", load_in_4bit=True)
    plain = load_model(spec, cuda).eval()
    _one_rank_group()
    model, dtype = _meta_base(spec, cuda)
    mesh = init_device_mesh("cuda", (1,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    materialize(model, tiny_qwen2, cuda, dtype, DistEnv(0, 1, 0, cuda))
    model.eval()
    gen = torch.Generator().manual_seed(0)
    batch = [Encoded(f"e{i}", tuple(torch.randint(3, 500, (9,), generator=gen).tolist()),
                     tuple(torch.randint(3, 500, (6 + i,), generator=gen).tolist()),
                     tuple(torch.randint(3, 500, (4,), generator=gen).tolist())) for i in range(3)]
    with torch.no_grad():
        a, b = pair_logps(plain, batch, 0, 64), pair_logps(model, batch, 0, 64)
        model.unshard()
        for (name, p), (_, q) in zip(plain.named_parameters(), model.named_parameters()):
            if p.dtype == torch.uint8:
                full = q.full_tensor() if hasattr(q, "full_tensor") else q
                assert torch.equal(p.data.flatten(), full.data.flatten()), name
    assert torch.equal(a.chosen_logps, b.chosen_logps) and torch.equal(a.rejected_logps, b.rejected_logps)
