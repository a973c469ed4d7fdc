"""Global grad norm on the CPU: layout.gradnorm_partials gives every tensor its own contiguous run of partials,
the kernel's grid-stride loop (16-byte vectors, then a scalar tail) visits every element once, and
the finalize finds max_norm where AdamW's hyper array keeps it."""
import math

import numpy as np
import pytest

from llmqgen import layout
from llmqgen.codegen.families import gradnorm

E = 8  # bf16 elements per 16-byte load


def visits(n: int, blocks: int, threads: int = gradnorm.THREADS) -> np.ndarray:
    """How often the partial kernel's loops touch each of n elements, and which block owns it."""
    count, owner = np.zeros(n, int), np.full(n, -1)
    n_vec = n // E * E
    for b in range(blocks):
        for t in range(threads):
            tid = b * threads + t
            for i in range(tid * E, n_vec, blocks * threads * E):
                count[i:i + E] += 1
                owner[i:i + E] = b
            for i in range(n_vec + tid, n, blocks * threads):
                count[i] += 1
                owner[i] = b
    return count, owner


@pytest.mark.parametrize("n", [1, 7, 8, 2051, 3 * layout.GRADNORM_MIN_ELEMS + 5])
def test_loop_visits_every_element_once(n):
    blocks = layout.gradnorm_blocks(n)
    count, owner = visits(n, blocks)
    assert np.all(count == 1)
    assert set(owner) == set(range(blocks))  # no idle block: its partial would be a wasted launch slot


def test_norm_from_per_block_partials():
    rng = np.random.default_rng(0)
    sizes = [5, 4096, 3 * layout.GRADNORM_MIN_ELEMS + 3]
    grids, offsets, total = layout.gradnorm_partials(sizes)
    partials = np.full(total, np.nan)
    grads = [rng.normal(0, 1e-2, n) for n in sizes]
    for g, grid, off in zip(grads, grids, offsets):
        _, owner = visits(len(g), grid)
        partials[off:off + grid] = np.bincount(owner, weights=g * g, minlength=grid)
    assert not np.isnan(partials).any()  # each tensor's partials fill its run, and runs tile [0, total)
    assert math.sqrt(partials.sum()) == pytest.approx(np.linalg.norm(np.concatenate(grads)), rel=1e-12)


def test_partials_layout():
    n_big = 10 ** 9
    grids, offsets, total = layout.gradnorm_partials([1, layout.GRADNORM_MIN_ELEMS + 1, n_big])
    assert grids == [1, 2, layout.GRADNORM_MAX_BLOCKS]
    assert offsets == [0, 1, 3] and total == 3 + layout.GRADNORM_MAX_BLOCKS
    assert layout.gradnorm_partials([]) == ([], [], 0)
    with pytest.raises(ValueError, match="non-empty"):
        layout.gradnorm_partials([0])


def test_finalize_reads_max_norm_from_hyper():
    from llmqgen.codegen.families import adamw
    assert gradnorm.context({})["GRADNORM_MAX_NORM_SLOT"] == adamw.HYPER.index("max_norm")
    assert gradnorm.SLOT[1] == "clip_scale"
