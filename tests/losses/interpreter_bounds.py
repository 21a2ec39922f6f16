"""
Out-of-bounds memory checks for kernels run by Triton's interpreter (``TRITON_INTERPRET=1``).

The interpreter reads and writes through raw host pointers without checking them, so an
out-of-bounds access reads neighbouring memory or corrupts it silently; on a GPU the
same access is a crash or, inside the caching allocator's blocks, garbage.  While
:func:`checked_accesses` is active, every load and store of an active lane (its mask
true; every lane of an unmasked access) must fall inside the storage of one of the
kernel's tensor arguments, or :class:`OutOfBounds` is raised naming the kernel, the
address and the nearest argument.  That is the check compute-sanitizer's memcheck does
on a GPU, without PyTorch's caching allocator hiding accesses inside its blocks.
"""

import contextlib

import numpy as np


class OutOfBounds(AssertionError):
    pass


class _Checker:
    def __init__(self, interpreter):
        self.interpreter = interpreter
        self.kernel = "?"
        self.ranges = np.zeros((0, 2), dtype=np.uint64)  # [start, end) of each argument's storage
        self.names = []
        self.accesses = 0

    def record_arguments(self, kernel_name, args, kwargs):
        spans = {}
        for name, value in list(enumerate(args)) + list(kwargs.items()):
            if hasattr(value, "untyped_storage"):
                storage = value.untyped_storage()
                spans[storage.data_ptr()] = (storage.data_ptr() + storage.nbytes(), str(name))
        self.kernel = kernel_name
        self.ranges = np.array(
            [(start, end) for start, (end, _) in spans.items()], dtype=np.uint64
        ).reshape(-1, 2)
        self.names = [name for _, name in spans.values()]

    def check(self, what, ptrs, mask):
        addresses = np.broadcast_to(ptrs.data, np.broadcast(ptrs.data, mask.data).shape)
        addresses = (
            addresses[np.broadcast_to(mask.data, addresses.shape).astype(bool)]
            .astype(np.uint64)
            .ravel()
        )
        if addresses.size == 0:
            return
        self.accesses += addresses.size
        size = np.uint64(np.dtype(self.interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize)
        inside = (
            (addresses[:, None] >= self.ranges[None, :, 0])
            & (addresses[:, None] + size <= self.ranges[None, :, 1])
        ).any(axis=1)
        if not inside.all():
            bad = int(addresses[~inside][0])
            nearest = (
                int(np.argmin(np.abs(self.ranges.astype(np.int64) - bad).min(axis=1)))
                if self.names
                else None
            )
            where = (
                ""
                if nearest is None
                else ", nearest argument {} [{:#x}, {:#x})".format(
                    self.names[nearest], int(self.ranges[nearest, 0]), int(self.ranges[nearest, 1])
                )
            )
            raise OutOfBounds(
                "{}: {} of {} lanes outside every tensor argument, first at {:#x}{}".format(
                    self.kernel, what, int((~inside).sum()), bad, where
                )
            )


@contextlib.contextmanager
def checked_accesses():
    """Checks every interpreted load and store inside the block; yields the checker
    (``.accesses``)."""
    from triton.runtime import interpreter

    checker = _Checker(interpreter)
    builder = interpreter.interpreter_builder
    executor = interpreter.GridExecutor
    original_init_args, original_load, original_store = (
        executor._init_args_hst,
        builder.create_masked_load,
        builder.create_masked_store,
    )

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = original_init_args(self, args_dev, kwargs)
        checker.record_arguments(getattr(self.fn, "__name__", "?"), args_hst, kwargs_hst)
        return args_hst, kwargs_hst

    def masked_load(ptrs, mask, *rest):
        checker.check("load", ptrs, mask)
        return original_load(ptrs, mask, *rest)

    def masked_store(ptrs, value, mask, *rest):
        checker.check("store", ptrs, mask)
        return original_store(ptrs, value, mask, *rest)

    # create_load and create_store go through these (self.create_masked_*), so the
    # instance attributes catch unmasked accesses too.
    executor._init_args_hst = init_args
    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    try:
        yield checker
    finally:
        executor._init_args_hst = original_init_args
        del builder.create_masked_load, builder.create_masked_store
