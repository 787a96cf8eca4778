"""Two gloo processes give the single-process loss and gradients of the global batch."""

from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from slidefm.objectives import ContrastiveConfig, MultiModalContrastive

PAIRS = [["slide", "report"], ["slide", "expression"]]
SPLIT = [3, 5]  # unequal local batch sizes
SCENARIOS = [
    dict(kind="infonce", local_loss=False),
    dict(kind="infonce", local_loss=True),
    dict(kind="siglip", local_loss=False),
]


def global_batch():
    g = torch.Generator().manual_seed(0)
    n = sum(SPLIT)
    x = {"slide": torch.randn(n, 6, generator=g), "report": torch.randn(n, 5, generator=g),
         "expression": torch.randn(n, 4, generator=g)}
    present = {"slide": torch.ones(n, dtype=torch.bool),
               "report": torch.tensor([True, False, True, True, True, False, True, True]),
               # rank 1 (rows 3..7) has no expression at all: no valid slide-expression pair there
               "expression": torch.tensor([True, True, True, False, False, False, False, False])}
    return x, present


class Model(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        torch.manual_seed(1)
        self.enc = nn.ModuleDict({"slide": nn.Linear(6, 4), "report": nn.Linear(5, 4), "expression": nn.Linear(4, 4)})
        self.obj = MultiModalContrastive(ContrastiveConfig(pairs=PAIRS, pair_weights=[1.0, 0.5], **kw))

    def forward(self, x, present):
        return self.obj({k: self.enc[k](v) for k, v in x.items()}, present)


def run_one(model, x, present):
    out = model(x, present)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return float(out["loss"].detach()), {n.removeprefix("module."): g for n, g in grads.items()}


def worker(rank, path):
    # A file store, not a TCP one: with TCP, rank 0 hosts the store's server thread and its teardown raced the
    # other rank's ("terminate called without an active exception"; once in CI even after the barrier below).
    dist.init_process_group("gloo", init_method=f"file://{path}/store", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        x, present = global_batch()
        lo = sum(SPLIT[:rank])
        sl = slice(lo, lo + SPLIT[rank])
        x = {k: v[sl] for k, v in x.items()}
        present = {k: v[sl] for k, v in present.items()}
        results = []
        for kw in SCENARIOS:
            ddp = nn.parallel.DistributedDataParallel(Model(**kw))
            results.append(run_one(ddp, x, present))
        torch.save(results, f"{path}/rank{rank}.pt")
        # Both ranks done before either tears gloo down, so neither closes a pair the other still reads.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_matches_single_process(tmp_path):
    mp.spawn(worker, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x, present = global_batch()
    for i, kw in enumerate(SCENARIOS):
        ref_loss, ref_grads = run_one(Model(**kw), x, present)
        losses = [ranks[r][i][0] for r in range(2)]
        if kw["local_loss"]:
            # each rank returns world_size * its share: the mean over ranks is the global loss
            assert abs(sum(losses) / 2 - ref_loss) < 1e-5 * max(1.0, abs(ref_loss)), (kw, losses, ref_loss)
        else:
            for loss in losses:
                assert abs(loss - ref_loss) < 1e-5 * max(1.0, abs(ref_loss)), (kw, losses, ref_loss)
        for r in range(2):
            grads = ranks[r][i][1]
            assert grads.keys() == ref_grads.keys()
            for n, g in ref_grads.items():
                assert g.abs().sum() > 0 or "expression" in n, n
                torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{kw} {n}: {m}")
