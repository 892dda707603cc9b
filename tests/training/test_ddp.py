"""npn.objective under DistributedDataParallel: two CPU processes (gloo), different data per rank."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import npn_kernels as npn

WORLD = 2
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(rank)  # different initial weights and seeds per rank: DDP must broadcast rank 0's
        model = nn.Sequential(npn.GatedLinear(6, 8, l0=0.01), nn.ReLU(), npn.GatedLinear(8, 3, granularity="out"))
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.Adam(ddp.parameters(), lr=0.05)
        start = [p.detach().clone() for p in model.parameters()]
        gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
        for _ in range(STEPS):
            x, target = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
            optimizer.zero_grad()
            npn.objective(ddp, F.cross_entropy, x, target).backward()
            optimizer.step()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()] + [b.reshape(-1).double() for b in model.buffers()])
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat.contiguous())
        if rank == 0:
            moved = [not torch.equal(a, p.detach()) for a, p in zip(start, model.parameters())]
            torch.save({"gathered": gathered, "phi_moved": [moved[2], moved[5]]}, out)
        # both ranks leave together: a rank tearing gloo down while the other still works aborted
        # it once in ~10 runs ("terminate called without an active exception", SIGABRT)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_stay_identical(tmp_path):
    out = str(tmp_path / "result.pt")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    result = torch.load(out, weights_only=True)
    a, b = result["gathered"]
    assert torch.equal(a, b)  # weights, phi and the noise counters agree on both ranks
    assert all(result["phi_moved"])
