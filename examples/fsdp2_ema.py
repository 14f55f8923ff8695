"""EMA of an FSDP2 model, sharded: each rank averages its own shards, checkpoints with DCP.

Run on CPU (gloo) with two processes:

    torchrun --nproc_per_node 2 examples/fsdp2_ema.py --out /tmp/fsdp2_ema

It trains a small MLP sharded with ``fully_shard``, keeps an EMA with ``weightavg.Averager``
(storage per rank: its local elements in float32; no communication per update), evaluates the
average with ``swapped_in`` (shard-local, no gather), saves the average with
``torch.distributed.checkpoint`` (DCP, each shard written once), loads it back (on any number of
ranks: DCP reshards), and writes the full averaged weights to ``avg.safetensors`` (rank 0, one
tensor gathered at a time). ``weightavg export OUT/avg_dcp -o avg.safetensors`` does the same
from the checkpoint alone, without torch.distributed.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.fsdp import fully_shard

import weightavg as wa


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="fsdp2_ema_out")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank = dist.get_rank()
    out = Path(args.out)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 33), nn.ReLU(), nn.Linear(33, 4))  # 33: uneven shards
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ema = wa.Averager(model, rule=wa.ema(0.9))  # float32 storage of this rank's shards only

    g = torch.Generator().manual_seed(rank)  # each rank its own data, as with a DistributedSampler
    w_true = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(args.steps):
        x = torch.randn(32, 16, generator=g)
        loss = (model(x) - x @ w_true).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema.update(model)  # local shards only: no collective

    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        live = (model(x) - x @ w_true).pow(2).mean()
        with ema.swapped_in(model):  # writes the averaged shards in place, restores them after
            averaged = (model(x) - x @ w_true).pow(2).mean()

    # checkpoint: the averager's state holds DTensors, DCP writes each shard once
    dcp.save({"ema": ema.state_dict()}, checkpoint_id=out / "avg_dcp")
    # resume (here on the same ranks; with another number of ranks DCP reshards on load)
    resumed = wa.Averager(model, rule=wa.ema(0.9))
    state = {"ema": resumed.state_dict()}
    dcp.load(state, checkpoint_id=out / "avg_dcp")
    resumed.load_state_dict(state["ema"])
    same = all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in
               zip(ema.averaged_tensors().values(), resumed.averaged_tensors().values(), strict=True))

    # full weights for serving: one tensor gathered at a time, kept on rank 0
    full = ema.export_state_dict(full=True, rank0_only=True, cpu=True)
    if rank == 0:
        from safetensors.torch import save_file

        save_file(full, str(out / "avg.safetensors"))
        print(f"world {dist.get_world_size()}: loss live {live:.4f}, EMA {averaged:.4f}; "
              f"checkpoint reloads equal: {same}; wrote {out / 'avg.safetensors'} ({len(full)} tensors)")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    main()
