"""Resource accounting: fractional CPUs/GPUs, GPU ids, custom resources, explanations."""

from __future__ import annotations

from flotilla._private.resources import ResourcePool


def test_fractional_gpus_share_a_device_and_whole_gpus_do_not():
    pool = ResourcePool({"CPU": 8, "GPU": 2})
    a = pool.try_allocate({"CPU": 1, "GPU": 0.5})
    b = pool.try_allocate({"CPU": 1, "GPU": 0.5})
    assert a and b and a.gpu_ids == b.gpu_ids == [0]
    c = pool.try_allocate({"CPU": 1, "GPU": 1})
    assert c and c.gpu_ids == [1]
    assert pool.try_allocate({"CPU": 1, "GPU": 0.1}) is None
    pool.release(a)
    d = pool.try_allocate({"CPU": 1, "GPU": 0.25})
    assert d and d.gpu_ids == [0]


def test_two_gpus_need_two_free_devices():
    pool = ResourcePool({"CPU": 4, "GPU": 2})
    assert pool.try_allocate({"GPU": 0.5})
    assert pool.try_allocate({"GPU": 2}) is None
    assert "GPU" in pool.shortfall({"GPU": 2})


def test_cpu_accounting_is_exact_with_fractions():
    pool = ResourcePool({"CPU": 1})
    allocs = [pool.try_allocate({"CPU": 0.1}) for _ in range(10)]
    assert all(allocs)
    assert pool.try_allocate({"CPU": 0.1}) is None
    for a in allocs:
        pool.release(a)
    assert pool.available()["CPU"] == 1


def test_shortfall_explains_what_is_missing():
    pool = ResourcePool({"CPU": 2})
    msg = pool.shortfall({"CPU": 4})
    assert "CPU" in msg and "needs 4" in msg and "2 available" in msg
    assert not pool.fits_ever({"CPU": 4})
    assert not pool.fits_ever({"custom": 1})
    assert pool.fits_ever({"CPU": 2})
