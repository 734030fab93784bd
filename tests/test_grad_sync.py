"""FlatGrads / broadcast_params_ (protodepth/grad_sync.py): gradient averaging without DDP, checked against DDP
with 2 CPU processes over gloo."""
import contextlib
import copy
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from protodepth.grad_sync import FlatGrads, broadcast_params_

ADAM_STEPS = 3
TINY_BUCKET_MB = 1 / 1024  # 1 KiB buckets: several all-reduces in flight at once


class Net(nn.Module):
    """A channels-last conv, a contiguous conv, BatchNorm, a linear head and a float64 parameter (two buffers)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1).to(memory_format=torch.channels_last)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, stride=2)
        self.head = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3, dtype=torch.float64))

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x.contiguous(memory_format=torch.channels_last))))
        x = self.conv2(x).mean(dim=(2, 3))
        return self.head(x) * self.scale.float()


def _loss(model, x):
    return (model(x) ** 2).mean()


def _batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)  # different data on every rank
    return torch.randn(4, 3, 10, 10, generator=g)


def _view_report(grads: FlatGrads) -> list[dict]:
    rows = []
    for p in grads.params:
        buf = grads.buffers[(p.device, p.dtype)]
        start, end = buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()
        rows.append({"inside": start <= p.grad.data_ptr() < end, "grad_stride": p.grad.stride(),
                     "param_stride": p.stride(), "shares_storage": p.grad.untyped_storage().data_ptr()
                     == buf.untyped_storage().data_ptr()})
    return rows


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different initial weights on every rank: both sides must take rank 0's
        model = Net()
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(model))  # broadcasts rank 0's state
        broadcast_params_(list(model.parameters()) + list(model.buffers()))
        grads = FlatGrads(model.parameters(), bucket_mb=TINY_BUCKET_MB)
        assert len(grads.buckets) > 2

        x = _batch(rank, 0)
        _loss(ddp, x).backward()
        _loss(model, x).backward()
        views = _view_report(grads)  # after backward: autograd must have written into the views, not replaced them
        grads.all_reduce_mean_()
        first = {"ours": [p.grad.clone() for p in model.parameters()],
                 "ddp": [p.grad.clone() for p in ddp.module.parameters()],
                 "views": views, "buckets": len(grads.buckets)}

        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for step in range(1, ADAM_STEPS + 1):
            opt.step()
            opt.zero_grad(set_to_none=True)  # detaches the views; zero_() re-attaches them
            grads.zero_()
            _loss(model, _batch(rank, step)).backward()
            grads.all_reduce_mean_()
        opt.step()
        first["params_after_adam"] = [p.detach().clone() for p in model.parameters()]
        torch.save(first, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run `_worker` on 2 forked CPU processes over gloo once; returns each rank's saved results."""
    out = tmp_path_factory.mktemp("grad_sync")
    mp.start_processes(_worker, args=(2, _free_port(), str(out)), nprocs=2, start_method="fork")
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_all_reduce_mean_gives_ddp_gradients(two_ranks):
    for r in two_ranks:
        assert r["buckets"] > 2
        for ours, ddp in zip(r["ours"], r["ddp"], strict=True):
            assert ours.dtype == ddp.dtype
            torch.testing.assert_close(ours, ddp, atol=1e-6, rtol=1e-6)
    # the mean really crossed ranks: both ranks hold the same gradients although their data differ
    for a, b in zip(two_ranks[0]["ours"], two_ranks[1]["ours"]):
        assert torch.equal(a, b)


def test_adam_steps_leave_ranks_bit_identical(two_ranks):
    p0, p1 = (r["params_after_adam"] for r in two_ranks)
    assert all(torch.equal(a, b) for a, b in zip(p0, p1, strict=True))
    # and training moved them (the check is not comparing untouched weights)
    torch.manual_seed(0)
    assert not all(torch.equal(a, b.detach()) for a, b in zip(p0, Net().parameters()))


def test_grads_are_strided_views_of_the_flat_buffer(two_ranks):
    for r in two_ranks:
        for row in r["views"]:
            assert row["inside"] and row["shares_storage"]
            assert row["grad_stride"] == row["param_stride"]
    # the channels-last conv weight keeps its channels-last strides
    strides = [row["param_stride"] for row in two_ranks[0]["views"]]
    assert (27, 1, 9, 3) in strides  # conv1.weight (8, 3, 3, 3) channels-last


def test_flat_grads_one_buffer_per_dtype_and_in_place_accumulation():
    model = Net()
    grads = FlatGrads(list(model.parameters()) + [model.scale])  # a repeated parameter counts once
    assert set(grads.buffers) == {(torch.device("cpu"), torch.float32), (torch.device("cpu"), torch.float64)}
    x = _batch(0, 0)
    _loss(model, x).backward()
    once = [p.grad.clone() for p in model.parameters()]
    _loss(model, x).backward()  # accumulates into the same views
    for p, g in zip(model.parameters(), once):
        torch.testing.assert_close(p.grad, 2 * g)
        assert p.grad.stride() == p.stride()
    grads.zero_()
    assert all(b.abs().sum() == 0 for b in grads.buffers.values())


def test_buckets_cover_each_buffer_exactly():
    model = Net()
    grads = FlatGrads(model.parameters(), bucket_mb=TINY_BUCKET_MB)
    assert all(b.numel() * b.element_size() <= 1024 for b in grads.buckets)
    assert sum(b.numel() for b in grads.buckets) == grads.numel()
    one = FlatGrads(Net().parameters())  # default 25 MB: one bucket per buffer
    assert len(one.buckets) == len(one.buffers)


def test_the_first_layers_get_a_small_bucket_of_their_own():
    """The buffer's first bucket (the first layers: written last by a backward, all-reduced last) is the small
    tail bucket; each parameter is mapped to exactly the buckets its view overlaps."""
    model = Net()
    grads = FlatGrads(model.parameters(), bucket_mb=4 * TINY_BUCKET_MB, tail_bucket_mb=TINY_BUCKET_MB / 4)
    for buf in grads.buffers.values():  # 256-byte tail bucket at the start of each buffer, then 4 KiB ones
        end = buf.data_ptr() + buf.numel() * buf.element_size()
        own = [b for b in grads.buckets if buf.data_ptr() <= b.data_ptr() < end]
        assert own[0].data_ptr() == buf.data_ptr() and own[0].numel() == min(buf.numel(), 256 // buf.element_size())
        assert all(b.numel() * b.element_size() <= 4096 for b in own)
    assert len(grads.buckets) == 3  # fp32: 64 + 544 elements; fp64: 8
    assert sum(b.numel() for b in grads.buckets) == grads.numel()
    for p, view, buckets in zip(grads.params, grads._views, grads._param_buckets, strict=True):
        lo = view.data_ptr()
        hi = lo + p.numel() * p.element_size()
        overlapping = [i for i, b in enumerate(grads.buckets) if b.data_ptr() < hi
                       and lo < b.data_ptr() + b.numel() * b.element_size()]
        assert buckets == overlapping


def test_without_process_group_sync_is_a_no_op():
    model = Net()
    grads = FlatGrads(model.parameters())
    _loss(model, _batch(0, 0)).backward()
    before = [p.grad.clone() for p in model.parameters()]
    grads.all_reduce_mean_()
    broadcast_params_(model.parameters())
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))


def test_non_dense_parameter_is_refused():
    p = nn.Parameter(torch.zeros(4, 6)[:, ::2])
    with pytest.raises(ValueError, match="not dense"):
        FlatGrads([p])


class NetWithUnused(Net):
    """Net plus a parameter the loss never reaches: its bucket is completed by no hook."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.ones(7))


def _overlap_worker(rank, world, port, out_dir):
    """DDP against FlatGrads.reduce_during_backward on the same data, recording when each all-reduce started."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)
        model = NetWithUnused()
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(model), find_unused_parameters=True)
        broadcast_params_(list(model.parameters()) + list(model.buffers()))
        grads = FlatGrads(model.parameters(), bucket_mb=TINY_BUCKET_MB)
        fired = [0]  # parameters whose gradient is complete so far (hooks registered first run first)
        for p in grads.params:
            p.register_post_accumulate_grad_hook(lambda _p: fired.__setitem__(0, fired[0] + 1))
        starts, real_all_reduce = [], dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):
            starts.append((tensor.data_ptr(), fired[0]))
            return real_all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce
        results = {}
        for window in range(2):  # twice: the hooks come off after the block and go on again
            x = _batch(rank, window)
            ddp.zero_grad(set_to_none=False)
            _loss(ddp, x).backward()
            grads.zero_()
            fired[0] = 0
            starts.clear()
            with grads.reduce_during_backward():
                _loss(model, x).backward()
                inside = len(starts)
            results[window] = {"ours": [p.grad.clone() for p in model.parameters()],
                               # DDP leaves an unreached gradient None; the flat buffer holds zeros there
                               "ddp": [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                       for p in ddp.module.parameters()],
                               "starts": list(starts), "inside": inside}
        # gradient accumulation: a first micro-batch's backward outside the block (DDP: no_sync), the window's
        # last one inside it: the average is of the accumulated sums
        ddp.zero_grad(set_to_none=False)
        grads.zero_()
        with ddp.no_sync():
            _loss(ddp, _batch(rank, 5)).backward()
        _loss(ddp, _batch(rank, 6)).backward()
        _loss(model, _batch(rank, 5)).backward()
        with grads.reduce_during_backward():
            _loss(model, _batch(rank, 6)).backward()
        results["accumulated"] = {"ours": [p.grad.clone() for p in model.parameters()],
                                  "ddp": [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                          for p in ddp.module.parameters()]}
        dist.all_reduce = real_all_reduce
        results.update(buckets=[b.data_ptr() for b in grads.buckets], params=len(grads.params))
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def overlapped(tmp_path_factory):
    out = tmp_path_factory.mktemp("grad_overlap")
    mp.start_processes(_overlap_worker, args=(2, _free_port(), str(out)), nprocs=2, start_method="fork")
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_averaging_during_the_backward_gives_ddp_gradients_also_after_accumulation(overlapped):
    for r in overlapped:
        for window in (0, 1, "accumulated"):
            for ours, ddp in zip(r[window]["ours"], r[window]["ddp"], strict=True):
                torch.testing.assert_close(ours, ddp, atol=1e-6, rtol=1e-6)
    for a, b in zip(overlapped[0][1]["ours"], overlapped[1][1]["ours"], strict=True):
        assert torch.equal(a, b)


def test_buckets_start_while_the_backward_still_runs(overlapped):
    """Overlap: the first all-reduce starts before the last gradient is written. In the first backward the
    unused parameter holds its bucket (and those after it in the launch order) until the block ends; from the
    second on it is known to be unreached and every bucket starts inside the backward."""
    for r in overlapped:
        first, second = r[0], r[1]
        assert len(first["starts"]) == len(second["starts"]) == len(r["buckets"])  # each bucket once
        assert first["inside"] < len(r["buckets"])
        assert second["inside"] == len(r["buckets"])
        assert second["starts"][0][1] < r["params"] - 1  # parameters still to come when the first bucket left


def test_buckets_start_in_one_order_on_every_rank(overlapped):
    """Collectives must match across ranks: descending bucket order, the same on both ranks and every step."""
    for r in overlapped:
        order = [r["buckets"].index(ptr) for ptr, _ in r[0]["starts"]]
        assert order == sorted(order, reverse=True)
        assert [p for p, _ in r[1]["starts"]] == [p for p, _ in r[0]["starts"]]


def test_a_replaced_gradient_is_an_error_not_a_stale_average():
    model = Net()
    grads = FlatGrads(model.parameters())
    model.head.weight.grad = torch.zeros_like(model.head.weight)  # no longer the view
    # a process group of one rank skips the hooks; check the hook itself with a fake two-rank launcher
    from protodepth.grad_sync import _BucketLauncher

    launcher = _BucketLauncher.__new__(_BucketLauncher)
    launcher.grads, launcher.reached, launcher.skip = grads, set(), set()
    i = next(k for k, p in enumerate(grads.params) if p is model.head.weight)
    with pytest.raises(RuntimeError, match="replaced a parameter's .grad"):
        launcher.hook(i)(model.head.weight)


@pytest.mark.cuda
def test_graphed_backward_writes_into_the_flat_buffer():
    """The reason FlatGrads exists: a backward captured in a CUDA graph accumulates into the buffer's views,
    so every replay leaves this step's gradients where all_reduce_mean_ reads them."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    model = Net().cuda()
    grads = FlatGrads(model.parameters())
    static_x = _batch(0, 0).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # eager warm-up on a side stream, as capture requires
        for _ in range(3):
            grads.zero_()
            _loss(model, static_x).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    grads.zero_()
    with torch.cuda.graph(graph):
        _loss(model, static_x).backward()

    x = _batch(0, 1).cuda()
    static_x.copy_(x)
    grads.zero_()
    graph.replay()
    torch.cuda.synchronize()
    graphed = [p.grad.clone() for p in model.parameters()]
    assert all(row["inside"] and row["grad_stride"] == row["param_stride"] for row in _view_report(grads))
    grads.zero_()
    _loss(model, x).backward()
    for g, p in zip(graphed, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)


def _nccl_graph_worker(rank, world, port, out_dir):
    """One GPU per rank: a backward captured inside reduce_during_backward (the NCCL all-reduces recorded in the
    graph) against the eager backward averaged after it."""
    def reached(stage: str) -> None:  # where a hung rank stopped, for the failure message
        with open(f"{out_dir}/stage{rank}.txt", "a") as fh:
            fh.write(stage + "\n")

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    graph = None
    try:
        reached("init")
        torch.manual_seed(0)
        model = Net().cuda()
        grads = FlatGrads(model.parameters(), bucket_mb=TINY_BUCKET_MB)
        static_x = _batch(rank, 0).cuda()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # eager warm-up: creates the communicator before the capture
            for _ in range(3):
                grads.zero_()
                with grads.reduce_during_backward():
                    _loss(model, static_x).backward()
        torch.cuda.current_stream().wait_stream(side)
        reached("warm-up")
        graph = torch.cuda.CUDAGraph()
        grads.zero_()
        # thread_local, as the trainer captures: NCCL's watchdog thread queries events during the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            with grads.reduce_during_backward():
                _loss(model, static_x).backward()
        reached("capture")
        rows = []
        for step in range(1, 4):
            x = _batch(rank, step).cuda()
            static_x.copy_(x)
            grads.zero_()
            graph.replay()
            replayed = [p.grad.clone() for p in model.parameters()]
            grads.zero_()
            _loss(model, x).backward()
            grads.all_reduce_mean_()
            rows.append({"replayed": [g.cpu() for g in replayed], "after": [p.grad.cpu() for p in model.parameters()]})
        reached("replays")
        torch.save(rows, f"{out_dir}/rank{rank}.pt")
    finally:
        # the graph holds NCCL work on the group's communicator: free it, and let it finish, before the group ends
        del graph
        torch.cuda.synchronize()
        reached("freed")
        dist.destroy_process_group()
        reached("destroyed")


@pytest.mark.cuda
def test_captured_overlapped_all_reduce_averages_like_an_all_reduce_after_the_backward(tmp_path):
    """The trainer's data-parallel graph: each replay runs the recorded NCCL all-reduces bucket by bucket inside
    the backward; the result must be the gradient averaged over both GPUs, equal on both, at every replay."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    ctx = mp.start_processes(_nccl_graph_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                             start_method="spawn", join=False)
    deadline = time.monotonic() + 90  # a captured collective has no NCCL timeout: a failed rank hangs its peer
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            stages = {r: (tmp_path / f"stage{r}.txt").read_text().split() if (tmp_path / f"stage{r}.txt").exists()
                      else [] for r in range(2)}
            pytest.fail(f"the 2-GPU capture test did not finish in 90 s; stages reached per rank: {stages}")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rows in ranks:
        for row in rows:
            for a, b in zip(row["replayed"], row["after"], strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for a, b in zip(ranks[0][-1]["replayed"], ranks[1][-1]["replayed"]):
        assert torch.equal(a, b)
    # the steps differ in data, so a replay that ignored its input would fail here
    assert not torch.equal(ranks[0][0]["replayed"][0], ranks[0][1]["replayed"][0])


@pytest.mark.parametrize("overlap", [True, False])
def test_overlap_decides_whether_averaging_happens_in_the_backward_or_after_it(monkeypatch, overlap):
    grads = FlatGrads(Net().parameters(), overlap=overlap)
    calls = []
    monkeypatch.setattr(grads, "all_reduce_mean_", lambda group=None: calls.append("after"))
    monkeypatch.setattr(grads, "reduce_during_backward", lambda group=None: calls.append("during") or
                        contextlib.nullcontext())
    with grads.backward_block():
        pass
    grads.after_backward()
    assert calls == (["during"] if overlap else ["after"])
