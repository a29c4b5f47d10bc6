"""The ring pool: FIFO placement with wrap-around, reclaim order, overdrafts, and the stall simulation."""

from __future__ import annotations

from hermesd.engine.bufferpool import PAGE, RingPool
from hermesd.plan.ring import ring_stalls, smallest_stall_free_ring

P = PAGE


def test_regions_are_placed_in_order_and_wrap_when_the_tail_is_short():
    pool = RingPool(10 * P)
    a, b = pool.try_acquire(4 * P), pool.try_acquire(4 * P)
    assert (a.offset, b.offset) == (0, 4 * P) and len(a.view) == 4 * P
    assert pool.try_acquire(3 * P) is None, "only 2 pages left at the end and none at the start"
    pool.release(a)
    c = pool.try_acquire(3 * P)
    assert c.offset == 0, "wraps to the start once the oldest region is free"
    assert pool.try_acquire(2 * P) is None, "the 2 pages after b are behind the head until b is released"
    pool.release(b)
    assert pool.try_acquire(2 * P).offset == 3 * P
    assert pool.high_water == 8 * P


def test_out_of_order_release_is_reclaimed_once_older_regions_are_free():
    pool = RingPool(6 * P)
    a, b, c = (pool.try_acquire(2 * P) for _ in range(3))
    pool.release(b)
    assert pool.try_acquire(2 * P) is None, "b's space is behind a, which is still in use"
    pool.release(a)
    assert pool.try_acquire(4 * P).offset == 0
    pool.release(c)


def test_regions_are_real_reusable_memory():
    pool = RingPool(4 * P)
    region = pool.try_acquire(P)
    region.view[:5] = b"hello"
    pool.release(region)
    again = pool.try_acquire(P)
    assert again.offset == 0 and bytes(again.view[:5]) == b"hello", "the same pages, not new ones"


def test_overdraft_when_the_ring_is_full():
    pool = RingPool(2 * P)
    held = pool.try_acquire(2 * P)
    extra = pool.acquire_overdraft(P)
    assert extra.overdraft and len(extra.view) == P and pool.overdrafts == 1
    pool.release(extra)
    pool.release(held)
    assert pool.in_use == 0


def test_stall_simulation_finds_the_ring_the_big_stage_needs():
    # 3 small stages then one 4x larger: at depth 1 the window is 5 units but the ring must also
    # fit the big stage contiguously after a small one, which takes more.
    sizes = [P, P, P, 4 * P]
    assert ring_stalls(sizes, 1, 5 * P) > 0
    best = smallest_stall_free_ring(sizes, 1, 5 * P, 8 * P)
    assert 5 * P < best <= 8 * P and ring_stalls(sizes, 1, best) == 0
    assert ring_stalls(sizes, 1, best - P) > 0, "the smallest such size"
    assert smallest_stall_free_ring(sizes, 0, 4 * P, 8 * P) == 4 * P, "no prefetch: the largest stage"
