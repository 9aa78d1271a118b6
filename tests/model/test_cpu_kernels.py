"""The CPU kernels equal the PyTorch paths they replace, and release the GIL while they run."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from gptserve.model import cpu_kernels
from gptserve.model.attention import KVPool, PagedAttention, PagedMetadata
from gptserve.model.cpu_kernels import paged_decode, row_argmax

ROOT = Path(__file__).resolve().parents[2]


def test_the_kernel_builds_on_this_machine():
    assert paged_decode() is not None, "the C++ kernel did not build (a compiler and ninja are needed)"


def test_the_kernel_sources_ship_in_the_package():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shipped = config["tool"]["setuptools"]["package-data"]["gptserve.model"]
    model = Path(cpu_kernels.__file__).parent
    for source in cpu_kernels.SOURCES:
        assert source.is_file() and any(source.relative_to(model).match(glob) for glob in shipped), source


def test_a_failed_build_is_logged_by_its_first_compiler_error():
    output = ("Error building extension 'gptserve_cpu_kernels_v4': [1/2] c++ -MMD -MF cpu_kernels.o.d -O3\n"
              "FAILED: cpu_kernels.o\n"
              "/x/csrc/cpu_kernels.cpp: In function 'at::Tensor row_argmax(at::Tensor)':\n"
              "/x/csrc/cpu_kernels.cpp:66:3: error: expected ',' or ';' before 'auto'\n"
              "/x/csrc/cpu_kernels.cpp:68:17: error: 'out' was not declared in this scope\n")
    first = "/x/csrc/cpu_kernels.cpp:66:3: error: expected ',' or ';' before 'auto'"
    assert cpu_kernels._reason(RuntimeError(output)) == first
    # no compiler error (ninja or the compiler missing): the message's start, as it is
    assert cpu_kernels._reason(RuntimeError("Ninja is required to load C++ extensions")) == \
        "Ninja is required to load C++ extensions"


@pytest.mark.parametrize("batch,max_blocks", [(1, 1), (5, 9), (33, 4)])
def test_kernel_decode_equals_the_pytorch_path(batch, max_blocks, monkeypatch):
    g = torch.Generator().manual_seed(batch)
    pool = KVPool(num_layers=1, num_blocks=64, block_size=16, num_heads=4, head_dim=32,
                  dtype=torch.float32, device=torch.device("cpu"))
    pool.kv.normal_(generator=g)
    tables = torch.randint(0, 64, (batch, max_blocks), generator=g)
    lens = torch.randint(1, max_blocks * 16 + 1, (batch,), generator=g)
    q, k, v = (torch.randn(batch, 4, 32, generator=g) for _ in range(3))
    slots = tables[torch.arange(batch), (lens - 1) // 16] * 16 + (lens - 1) % 16
    meta = PagedMetadata(slot_mapping=slots, num_decode=batch, decode_block_tables=tables,
                         decode_context_lens=lens, decode_max_blocks=max_blocks)
    with_kernel = PagedAttention(pool, meta)(0, q, k, v, 0.2)
    monkeypatch.setattr("gptserve.model.attention.paged_decode", lambda: None)
    without = PagedAttention(pool, meta)(0, q, k, v, 0.2)
    torch.testing.assert_close(with_kernel, without, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,vocab", [(1, 50257), (64, 50257), (7, 5), (3, 33)])
def test_greedy_argmax_kernel_equals_torch_argmax(rows, vocab):
    kernel = row_argmax()
    assert kernel is not None, "the C++ kernels did not build"
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(rows, vocab, generator=g)
    torch.testing.assert_close(kernel(x), x.argmax(-1), rtol=0, atol=0)
    # ties go to the first index; -inf rows; NaN counts as the maximum (first NaN wins)
    x = torch.randint(0, 3, (rows, vocab), generator=g).float()
    x[0] = float("-inf")
    if rows > 1:
        x[1, vocab // 2] = float("nan")
        x[1, -1] = float("nan")
    torch.testing.assert_close(kernel(x), x.argmax(-1), rtol=0, atol=0)
    wide = torch.randn(rows, vocab + 7, generator=g)[:, :vocab]  # not contiguous
    torch.testing.assert_close(kernel(wide), wide.argmax(-1), rtol=0, atol=0)


def test_the_event_loop_runs_while_a_kernel_runs_on_another_thread():
    """The kernels release the GIL: while paged_decode runs on another thread (the engine's),
    the event loop on this one keeps running (in the server it sends SSE chunks meanwhile).
    Were the GIL held, the loop would get no turn at all until the kernel returned."""
    kernel = paged_decode()
    assert kernel is not None, "the C++ kernels did not build"
    # one call of some hundreds of ms: 2 sequences of 2M tokens in blocks of 2, one head each, so
    # it is two threads' work however many cores there are (the tables point into a small pool,
    # so it is compute, not memory, that takes the time)
    g = torch.Generator().manual_seed(0)
    batch, heads, dim, block_size, context, num_blocks = 2, 1, 64, 2, 2**21, 256
    k_cache, v_cache = (torch.randn(num_blocks, block_size, heads, dim, generator=g) for _ in range(2))
    tables = torch.randint(0, num_blocks, (batch, context // block_size), generator=g)
    lens = torch.full((batch,), context)
    q = torch.randn(batch, heads, dim, generator=g)
    started = threading.Event()

    def run_kernel():
        started.set()  # from here this thread goes straight into the kernel
        return kernel(q, k_cache, v_cache, tables, lens, dim ** -0.5)

    async def count_turns_while_it_runs():
        call = asyncio.ensure_future(asyncio.to_thread(run_kernel))
        turns = 0
        while not call.done():
            turns += started.is_set()
            # a real wait, not sleep(0): with the GIL held, the few ms in which the loop may run
            # while the kernel thread starts or hands back the GIL are worth a few turns, not hundreds
            await asyncio.sleep(0.001)
        return turns, call.result()

    turns, out = asyncio.run(count_turns_while_it_runs())
    assert out.shape == q.shape and bool(out.isfinite().all())
    assert turns >= 20, f"the event loop ran {turns} times while the kernel ran: is the GIL held?"


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    import os
    import time

    from gptserve.model import cpu_kernels

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = cpu_kernels._build_directory()
    lock = folder / "lock"
    lock.touch()
    assert cpu_kernels._build_directory() == folder and lock.exists()  # another process may be building
    stale = time.time() - cpu_kernels.STALE_LOCK_S - 1
    os.utime(lock, (stale, stale))
    assert cpu_kernels._build_directory() == folder and not lock.exists()
