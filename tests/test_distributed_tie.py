"""Tie under torch.distributed: two gloo ranks on CPU, each calibrating on its half of the batches,
find what one process finds on all of them, and a DistributedDataParallel fine-tune of the tied model
on halves of each batch ends where one process's fine-tune on the whole batches ends. Oracle: the single-process run on the union — the
feature sums (to 1e-12 in float64: only the order of additions differs), the permutations (also the
planted ones), and the merged weights of ``fxfuse.tie`` (bit for bit); and both ranks alike."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx
import torch.multiprocessing as mp

import fxfuse
from fxfuse.alignment import cross_correlation, match_permutation
from fxfuse.feedforward import find_feedforwards
from fxfuse.models import TinyDecoder
from fxfuse.tie import collect_features

WORLD = 2
WINDOWS = [(0, 1), (2, 3)]  # explicit: no selection in play
PAIRS = {0: {1}, 2: {3}}  # anchor (first) -> the members aligned to it
PLANTED = {1: 0, 3: 2}  # member -> the FF it is a noisy permuted copy of


@pytest.fixture(autouse=True)
def each_capture():
    """The sums do not depend on the capture: fxfuse.tie's default (torch.export first) only."""
    return "export"


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 32, (2, 8), generator=g) for _ in range(4)]


def planted_perm(member: int) -> torch.Tensor:
    return torch.randperm(32, generator=torch.Generator().manual_seed(10 + member))


def model() -> TinyDecoder:
    """FF 1 is FF 0 with its hidden neurons shuffled plus 10 % noise, FF 3 the same of FF 2: the
    alignment has a right answer, the merge is not exact."""
    torch.manual_seed(0)
    m = TinyDecoder(vocab=32, dim=16, layers=4, heads=2, hidden=32, context=16).eval()
    g = torch.Generator().manual_seed(2)
    noisy = lambda t: t + 0.1 * t.std() * torch.randn(t.shape, generator=g)  # noqa: E731
    with torch.no_grad():
        for member, source in PLANTED.items():
            src, dst, perm = m.blocks[source].ff, m.blocks[member].ff, planted_perm(member)
            dst.fc1.weight.copy_(noisy(src.fc1.weight[perm]))
            dst.fc1.bias.copy_(noisy(src.fc1.bias[perm]))
            dst.fc2.weight.copy_(noisy(src.fc2.weight[:, perm]))
            dst.fc2.bias.copy_(noisy(src.fc2.bias))
    return m


def run(data: list, distributed: bool) -> dict:
    """The statistics (all-reduced when ``distributed``, and this rank's own), the permutations and
    the ``fxfuse.tie`` result from ``data``, this rank's shard."""
    gm = fx.symbolic_trace(model())
    ffs = find_feedforwards(gm)
    stats, _ = collect_features(gm, ffs, data, PAIRS, distributed=distributed)
    local, _ = collect_features(gm, ffs, data, PAIRS)
    tied = fxfuse.tie(model(), data, windows=WINDOWS)  # distributed=None: all-reduced when a group is up
    sums = lambda s: {"n": s.n, "sum": s.sum, "sum_sq": s.sum_sq, "cross": s.cross}  # noqa: E731
    return {"stats": {i: sums(s) for i, s in stats.items()}, "local": {i: sums(s) for i, s in local.items()},
            "perms": {j: match_permutation(cross_correlation(stats[a], stats[j], stats[a].cross[j]))
                      for a in PAIRS for j in PAIRS[a]},
            "state": tied.state_dict(),
            "shared": [tied.blocks[a].ff is tied.blocks[j].ff for a in PAIRS for j in PAIRS[a]]}


def fine_tune(tied: torch.nn.Module, shard: slice, ddp: bool) -> dict:
    """Two SGD steps of next-token loss on ``shard`` of each training batch's rows, the model wrapped
    in DistributedDataParallel when ``ddp`` (which averages the ranks' gradients: on equal halves, the
    gradient of the mean loss over the whole batch that one process computes)."""
    trained = torch.nn.parallel.DistributedDataParallel(tied) if ddp else tied
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.5)
    tied.train()
    for x in batches()[:2]:
        x = x[shard]
        loss = torch.nn.functional.cross_entropy(trained(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in tied.state_dict().items()}


def worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'rendezvous')}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        data = batches()
        half = len(data) // WORLD
        out = run(data[rank * half:(rank + 1) * half], distributed=True)
        tied = fxfuse.tie(model(), data[rank * half:(rank + 1) * half], windows=WINDOWS)
        out["trained"] = fine_tune(tied, slice(rank, rank + 1), ddp=True)  # batches of 2 rows: one per rank
        out["still_shared"] = [tied.blocks[a].ff is tied.blocks[j].ff for a in PAIRS for j in PAIRS[a]]
        # an evaluate that differs by rank picks different windows: every rank must refuse alike
        by_rank = lambda m: float(m.blocks[0].ff is m.blocks[1].ff) * (1 if rank == 0 else -1)  # noqa: E731
        try:
            fxfuse.tie(model(), data[:1], remove=1, evaluate=by_rank)
            out["diverged"] = None
        except fxfuse.InputError as e:
            out["diverged"] = str(e)
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def rel(new: torch.Tensor, ref: torch.Tensor) -> float:
    """max |new − ref| / max |ref|: a sum that cancels is judged by the size of its terms' scale."""
    return ((new - ref).abs().max() / ref.abs().max()).item()


def test_two_ranks_on_halves_equal_one_process_on_all(tmp_path):
    mp.spawn(worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = run(batches(), distributed=False)

    positions = sum(b.numel() for b in batches())
    for i, ref in single["stats"].items():
        assert ref["n"] == positions
        for out in ranks:
            got = out["stats"][i]
            assert got["n"] == positions and out["local"][i]["n"] == positions // WORLD
            assert rel(got["sum"], ref["sum"]) <= 1e-12 and rel(got["sum_sq"], ref["sum_sq"]) <= 1e-12
            assert got["cross"].keys() == ref["cross"].keys() == PAIRS.get(i, set())
            assert all(rel(got["cross"][j], ref["cross"][j]) <= 1e-12 for j in got["cross"])
            assert rel(out["local"][i]["sum"], ref["sum"]) > 1e-2  # a shard alone is not the whole
        for key in ("sum", "sum_sq"):  # the all-reduce gives every rank the same bits
            assert torch.equal(ranks[0]["stats"][i][key], ranks[1]["stats"][i][key])

    for j, perm in single["perms"].items():
        assert torch.equal(perm, planted_perm(j).argsort())  # the planted shuffle is undone
        assert all(torch.equal(out["perms"][j], perm) for out in ranks)

    ref = single["state"]
    original = model().state_dict()
    assert not torch.equal(ref["blocks.0.ff.fc1.weight"], original["blocks.0.ff.fc1.weight"])  # merged
    expected = (original["blocks.0.ff.fc1.weight"] + original["blocks.1.ff.fc1.weight"][single["perms"][1]]) / 2
    assert torch.allclose(ref["blocks.0.ff.fc1.weight"], expected, rtol=0, atol=1e-6)  # Eq. 6, fp32 round-off
    for out in ranks:
        assert out["state"].keys() == ref.keys() and out["shared"] == single["shared"] == [True, True]
        assert all(torch.equal(out["state"][k], ref[k]) for k in ref)
        assert out["diverged"] is not None and "chose different windows" in out["diverged"]

    trained = fine_tune(fxfuse.tie(model(), batches(), windows=WINDOWS), slice(None), ddp=False)
    assert not torch.equal(trained["blocks.0.ff.fc1.weight"], ref["blocks.0.ff.fc1.weight"])  # it trained
    for out in ranks:  # DDP on halves = one process on the whole batch, up to float32 summation order
        assert out["still_shared"] == [True, True] and out["trained"].keys() == trained.keys()
        assert all(rel(out["trained"][k], trained[k]) <= 1e-5 for k in trained if trained[k].is_floating_point())


def test_distributed_true_without_a_process_group_is_refused():
    with pytest.raises(fxfuse.InputError, match="needs an initialized torch.distributed process group"):
        fxfuse.tie(model(), batches(), windows=WINDOWS, distributed=True)
