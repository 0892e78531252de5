"""pcl_ext.RingQueue and its op ring_enqueue_ against a row-by-row Python queue
(pcl_ext.reference.enqueue_rows)."""
import datetime
import io
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pcl_ext
from pcl_ext.reference import enqueue_rows

from conftest import cuda_only
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def randn(*shape, dtype=torch.float32, device="cpu", gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)


def run_op(buffer, ptr, keys):
    ptr_t = torch.tensor(ptr, device=buffer.device)
    buffer = buffer.clone()
    pcl_ext.ops.ring_enqueue_(buffer, ptr_t, keys)
    return buffer, int(ptr_t)


def check_against_reference(device, dtype, sizes=(1, 2, 5, 16)):
    """Every batch size class (1, size-1, size, size+1, >2x size) from every kind of start."""
    for size in sizes:
        for batch in sorted({1, max(size - 1, 1), size, size + 1, 2 * size + 3, 37}):
            for ptr in sorted({0, 1 % size, size // 2, size - 1}):
                buffer = randn(size, 3, dtype=dtype, device=device)
                keys = randn(batch, 3, dtype=dtype, device=device)
                got, got_ptr = run_op(buffer, ptr, keys)
                want, want_ptr = enqueue_rows(buffer, ptr, keys)
                assert got_ptr == want_ptr, (size, batch, ptr)
                assert torch.equal(got, want), (size, batch, ptr)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_row_by_row_reference(dtype):
    check_against_reference("cpu", dtype)


def test_module_matches_reference_over_many_steps():
    queue = pcl_ext.RingQueue(11, 4)
    assert queue.buffer.shape == (11, 4) and queue.ptr.dtype == torch.long
    torch.testing.assert_close(queue.buffer.norm(dim=1), torch.ones(11))  # MoCo's init
    want, want_ptr = queue.buffer.clone(), 0
    for batch in (3, 1, 11, 7, 25, 2, 0, 10):
        keys = torch.randn(batch, 4)
        queue.enqueue_(keys)
        want, want_ptr = enqueue_rows(want, want_ptr, keys)
        assert int(queue.ptr) == want_ptr
        assert torch.equal(queue.buffer, want)


def test_large_batch_runs_in_parallel_chunks():
    # Over the CPU kernel's grain: rows are split across threads, wrapping mid-way.
    buffer, keys = randn(3000, 128), randn(4500, 128)
    got, got_ptr = run_op(buffer, 2999, keys)
    want, want_ptr = enqueue_rows(buffer, 2999, keys)
    assert got_ptr == want_ptr and torch.equal(got, want)


def test_strided_keys_and_buffer():
    keys = randn(9, 10)
    views = {"transposed": keys.t().contiguous().t(), "every other column": keys[:, ::2],
             "offset rows": keys[2:]}
    for what, k in views.items():
        for buffer in (randn(7, k.shape[1]), randn(k.shape[1], 7).t()):  # row- and column-major
            got, got_ptr = run_op(buffer, 5, k)
            want, want_ptr = enqueue_rows(buffer, 5, k)
            assert got_ptr == want_ptr and torch.equal(got, want), what


def test_state_dict_round_trip_resumes_exactly():
    torch.manual_seed(0)
    queue = pcl_ext.RingQueue(13, 5, dtype=torch.float64)
    queue.enqueue_(torch.randn(9, 5, dtype=torch.float64))
    saved = io.BytesIO()
    torch.save(queue.state_dict(), saved)
    saved.seek(0)
    torch.manual_seed(1)  # a different initial buffer: the load must overwrite it
    resumed = pcl_ext.RingQueue(13, 5, dtype=torch.float64)
    assert not torch.equal(resumed.buffer, queue.buffer)
    resumed.load_state_dict(torch.load(saved))
    for batch in (6, 13, 1):
        keys = torch.randn(batch, 5, dtype=torch.float64)
        queue.enqueue_(keys)
        resumed.enqueue_(keys.clone())
    assert torch.equal(resumed.buffer, queue.buffer) and torch.equal(resumed.ptr, queue.ptr)
    assert int(queue.ptr) == (9 + 6 + 13 + 1) % 13
    assert set(queue.state_dict()) == {"buffer", "ptr"}


def test_load_rejects_pointer_out_of_range():
    queue = pcl_ext.RingQueue(4, 2)
    state = queue.state_dict()
    state["ptr"] = torch.tensor(4)
    with pytest.raises(ValueError, match="`ptr`"):
        queue.load_state_dict(state)


def test_keys_are_used_without_gradient():
    queue = pcl_ext.RingQueue(6, 3)
    weight = torch.randn(3, 3, requires_grad=True)
    keys = torch.randn(4, 3) @ weight
    queue.enqueue_(keys)
    assert not queue.buffer.requires_grad and queue.buffer.grad_fn is None
    assert torch.equal(queue.buffer[:4], keys.detach())


def test_module_follows_to_and_repr():
    queue = pcl_ext.RingQueue(4, 2, dtype=torch.bfloat16).to(torch.float64)  # buffers only
    assert queue.buffer.dtype == torch.float64 and queue.ptr.dtype == torch.long
    assert "size=4, dim=2" in repr(queue)


def test_gather_is_a_no_op_without_torch_distributed():
    assert not dist.is_initialized()
    queue = pcl_ext.RingQueue(5, 2, gather=True)
    queue.enqueue_(torch.ones(2, 2))
    assert int(queue.ptr) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    buffer, keys = randn(7, 6, dtype=dtype), randn(10, 6, dtype=dtype)
    torch.library.opcheck(torch.ops.pcl_ext.ring_enqueue_.default,
                          (buffer, torch.tensor(3), keys))


def test_torch_compile_fullgraph():
    queue, eager = pcl_ext.RingQueue(7, 4), pcl_ext.RingQueue(7, 4)
    eager.load_state_dict(queue.state_dict())

    def step(q, k):
        q.enqueue_(torch.nn.functional.normalize(k, dim=1))
        return q.buffer.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for batch in (3, 9):
        k = torch.randn(batch, 4)
        torch.testing.assert_close(compiled(queue, k), step(eager, k))
        assert torch.equal(queue.buffer, eager.buffer) and torch.equal(queue.ptr, eager.ptr)


def _op_case(mutation):
    d = dict(buffer=randn(5, 4), ptr=torch.tensor(1), keys=randn(3, 4))
    mutation(d)
    return d


OP_BAD_INPUTS = [  # (what, mutation, exception, message fragment)
    ("buffer rank", lambda d: d.update(buffer=d["buffer"][0]), ValueError, "`buffer`"),
    ("empty buffer", lambda d: d.update(buffer=d["buffer"][:0]), ValueError, "`buffer`"),
    ("int buffer", lambda d: d.update(buffer=d["buffer"].int(), keys=d["keys"].int()),
     TypeError, "`buffer`"),
    ("expanded buffer", lambda d: d.update(buffer=d["buffer"][:1].expand(5, 4)), ValueError,
     "`buffer`"),
    ("ptr dtype", lambda d: d.update(ptr=d["ptr"].int()), TypeError, "`ptr`"),
    ("ptr shape", lambda d: d.update(ptr=torch.tensor([1, 2])), ValueError, "`ptr`"),
    ("ptr too large", lambda d: d.update(ptr=torch.tensor(5)), IndexError, "`ptr`"),
    ("ptr negative", lambda d: d.update(ptr=torch.tensor(-1)), IndexError, "`ptr`"),
    ("keys dtype", lambda d: d.update(keys=d["keys"].double()), TypeError, "`keys`"),
    ("keys dim", lambda d: d.update(keys=d["keys"][:, :3]), ValueError, "`keys`"),
    ("keys rank", lambda d: d.update(keys=d["keys"][0]), ValueError, "`keys`"),
    ("keys alias buffer", lambda d: d.update(keys=d["buffer"][1:3]), ValueError, "`keys`"),
]


@pytest.mark.parametrize("what,mutation,exc,fragment", OP_BAD_INPUTS,
                         ids=[b[0] for b in OP_BAD_INPUTS])
def test_op_bad_input_names_the_argument(what, mutation, exc, fragment):
    d = _op_case(mutation)
    before = d["buffer"].clone()
    with pytest.raises(exc, match=fragment):
        pcl_ext.ops.ring_enqueue_(d["buffer"], d["ptr"], d["keys"])
    assert torch.equal(d["buffer"], before)


MODULE_BAD_INPUTS = [  # (what, call, exception, message fragment)
    ("size zero", lambda: pcl_ext.RingQueue(0, 4), ValueError, "`size`"),
    ("dim float", lambda: pcl_ext.RingQueue(4, 2.0), ValueError, "`dim`"),
    ("int dtype", lambda: pcl_ext.RingQueue(4, 2, dtype=torch.int64), TypeError, "`dtype`"),
    ("keys list", lambda: pcl_ext.RingQueue(4, 2).enqueue_([[1.0, 2.0]]), TypeError, "`keys`"),
    ("keys 1-D", lambda: pcl_ext.RingQueue(4, 2).enqueue_(torch.ones(2)), ValueError, "`keys`"),
    ("keys dim", lambda: pcl_ext.RingQueue(4, 2).enqueue_(torch.ones(3, 3)), ValueError,
     "`keys`"),
    ("keys dtype", lambda: pcl_ext.RingQueue(4, 2).enqueue_(torch.ones(3, 2, dtype=torch.half)),
     TypeError, "`keys`"),
    ("keys device", lambda: pcl_ext.RingQueue(4, 2).enqueue_(torch.ones(3, 2, device="meta")),
     ValueError, "`keys`"),
]


@pytest.mark.parametrize("what,call,exc,fragment", MODULE_BAD_INPUTS,
                         ids=[b[0] for b in MODULE_BAD_INPUTS])
def test_module_bad_input_names_the_argument(what, call, exc, fragment):
    with pytest.raises(exc, match=fragment):
        call()


# ---------------------------------------------------------------------------- distributed
WORLD, SIZE, DIM, BATCHES = 2, 7, 3, (3, 1, 5, 2)  # gathered: 6, 2, 10 (> SIZE), 4


def rank_keys(rank, step):
    """Different keys on every rank and step, reproducible in the parent process."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCHES[step], DIM, generator=gen)


def _distributed_worker(rank, out_dir):
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)  # the same initial rows on every rank
        shared = pcl_ext.RingQueue(SIZE, DIM)
        local = pcl_ext.RingQueue(SIZE, DIM, gather=False)
        local.load_state_dict(shared.state_dict())
        initial = shared.buffer.clone()
        for step in range(len(BATCHES)):
            shared.enqueue_(rank_keys(rank, step))
            local.enqueue_(rank_keys(rank, step))
        torch.save(dict(initial=initial, shared=shared.state_dict(), local=local.state_dict()),
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_gather_gives_every_rank_the_same_queue(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # inherited by the spawned workers
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    ctx = mp.start_processes(_distributed_worker, args=(str(tmp_path),), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed workers did not finish within 120 s")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    initial = results[0]["initial"]
    assert torch.equal(results[1]["initial"], initial)
    want, want_ptr = initial, 0
    for step in range(len(BATCHES)):
        gathered = torch.cat([rank_keys(r, step) for r in range(WORLD)])  # rank order
        want, want_ptr = enqueue_rows(want, want_ptr, gathered)
    for r, res in enumerate(results):
        assert torch.equal(res["shared"]["buffer"], want), f"rank {r}"
        assert int(res["shared"]["ptr"]) == want_ptr
        local, local_ptr = initial, 0
        for step in range(len(BATCHES)):
            local, local_ptr = enqueue_rows(local, local_ptr, rank_keys(r, step))
        assert torch.equal(res["local"]["buffer"], local) and int(res["local"]["ptr"]) == local_ptr


# ---------------------------------------------------------------------------------------- CUDA
@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_cuda(dtype):
    check_against_reference("cuda", dtype)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["dense", "misaligned", "strided", "column-major"])
def test_copy_units_cuda(dtype, layout):
    # Dense aligned rows move in 16-byte words; an odd offset or strides fall back to elements.
    base = randn(300, 257, dtype=dtype, device="cuda")
    keys = {"dense": base[:, :128].contiguous(), "misaligned": base[:, 1:129],
            "strided": base[:, :256:2], "column-major": base[:, :128].t().contiguous().t()}[layout]
    buffer = randn(257, 128, dtype=dtype, device="cuda")
    if layout == "column-major":
        buffer = buffer.t().contiguous().t()
    got, got_ptr = run_op(buffer, 200, keys)
    want, want_ptr = enqueue_rows(buffer, 200, keys)
    assert got_ptr == want_ptr and torch.equal(got, want)


@cuda_only
def test_many_blocks_advance_the_pointer_once_cuda():
    # 40000 rows of 512 bytes: the grid is capped, every block takes a pointer ticket.
    queue = pcl_ext.RingQueue(40000, 128, device="cuda")
    want, want_ptr = queue.buffer.clone(), 0
    for batch in (50000, 1, 39999, 40000, 12345):
        keys = torch.randn(batch, 128, device="cuda")
        queue.enqueue_(keys)
        want, want_ptr = run_reference_fast(want, want_ptr, keys)
        assert int(queue.ptr) == want_ptr
        assert torch.equal(queue.buffer, want)


def run_reference_fast(buffer, ptr, keys):
    """enqueue_rows for big batches: the same rows, by index arithmetic (checked on CPU below)."""
    size, batch = buffer.shape[0], keys.shape[0]
    keep = keys[max(batch - size, 0):]
    rows = (ptr + max(batch - size, 0) + torch.arange(keep.shape[0], device=keys.device)) % size
    buffer = buffer.clone()
    buffer[rows] = keep
    return buffer, (ptr + batch) % size


def test_fast_reference_agrees_with_row_by_row():
    buffer = randn(6, 2)
    for batch in (1, 5, 6, 7, 14):
        keys = randn(batch, 2)
        fast, fast_ptr = run_reference_fast(buffer, 4, keys)
        slow, slow_ptr = enqueue_rows(buffer, 4, keys)
        assert fast_ptr == slow_ptr and torch.equal(fast, slow)


@cuda_only
def test_no_host_sync_and_graph_capture_cuda():
    queue = pcl_ext.RingQueue(1000, 64, device="cuda")
    static = torch.zeros(300, 64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda.set_sync_debug_mode("error")  # any device-to-host sync raises
        try:
            queue.enqueue_(static)  # warm-up, as graph capture wants
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            queue.enqueue_(static)
    torch.cuda.current_stream().wait_stream(side)
    want, want_ptr = queue.buffer.cpu(), int(queue.ptr)
    assert want_ptr == 300  # capture recorded the launch without running it
    for _ in range(5):
        keys = torch.randn(300, 64, device="cuda")
        static.copy_(keys)
        graph.replay()
        want, want_ptr = enqueue_rows(want, want_ptr, keys.cpu())
    torch.cuda.synchronize()
    assert int(queue.ptr) == want_ptr and torch.equal(queue.buffer.cpu(), want)


@cuda_only
def test_opcheck_and_bad_devices_cuda():
    buffer, keys = randn(9, 8, device="cuda"), randn(20, 8, device="cuda")
    torch.library.opcheck(torch.ops.pcl_ext.ring_enqueue_.default,
                          (buffer, torch.tensor(4, device="cuda"), keys))
    with pytest.raises(ValueError, match="`ptr` must be on cuda"):
        pcl_ext.ops.ring_enqueue_(buffer, torch.tensor(4), keys)
    with pytest.raises(ValueError, match="`keys` must be on cuda"):
        pcl_ext.ops.ring_enqueue_(buffer, torch.tensor(4, device="cuda"), keys.cpu())
    with pytest.raises(ValueError, match="`keys`"):
        pcl_ext.RingQueue(9, 8, device="cuda").enqueue_(keys.cpu())
