"""
Runs the fused SSIM loss, forward and backward, through Triton's real JIT launch path
for an H100 (sm_90) on a machine without a GPU, and prints every launch as JSON.

Triton's active driver is replaced by one that reports an sm_90 device and records
launches instead of performing them: argument binding, specialisation, the cache key,
compilation to a cubin and the launcher's argument list all run as they would on the
GPU; only the kernels do not execute (their outputs are meaningless).  Run by
``tests/losses/test_ssim_triton.py::test_launch_path_for_h100`` in a subprocess, because the
driver swap is process-wide:

    python tests/losses/sm90_launch_check.py

``--compilations`` counts instead how many times each kernel would be compiled over the
FPN levels of a range of training image sizes (Detectron2's resizing and padding), by
recording Triton's compile keys instead of compiling (nothing is compiled or run):

    python tests/losses/sm90_launch_check.py --compilations
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime import driver

LAUNCHES = []
RESOURCES = {}  # kernel name -> registers and local (spill) bytes, from cuobjdump


class _RecordingLauncher:
    """Stands in for the CUDA launcher: checks and records the launch's arguments."""

    def __init__(self, src, metadata):
        self.name = src.fn.__name__
        self.signature = dict(src.signature)
        self.metadata = metadata

    def __call__(
        self,
        grid_x,
        grid_y,
        grid_z,
        stream,
        function,
        packed_metadata,
        launch_metadata,
        enter_hook,
        exit_hook,
        *args
    ):
        if len(args) != len(self.signature):
            raise TypeError(
                "{}: {} arguments for {} parameters".format(
                    self.name, len(args), len(self.signature)
                )
            )
        kinds = []
        for (name, kind), value in zip(self.signature.items(), args):
            if kind == "constexpr":
                continue
            if kind.startswith("*") != isinstance(value, torch.Tensor):
                raise TypeError(
                    "{}: argument {} is {!r}, the kernel expects {}".format(
                        self.name, name, type(value).__name__, kind
                    )
                )
            kinds.append(kind)
        LAUNCHES.append(
            dict(
                {
                    "kernel": self.name,
                    "grid": [grid_x, grid_y, grid_z],
                    "arguments": kinds,
                    "num_warps": self.metadata.num_warps,
                    "shared": self.metadata.shared,
                },
                **RESOURCES.get(self.name, {})
            )
        )


class _Utils:
    def get_device_properties(self, device):
        return {
            "max_shared_mem": 232448,
            "multiprocessor_count": 132,
            "max_num_regs": 65536,
            "warpSize": 32,
        }

    def load_binary(self, name, kernel, shared, device):
        """Reads the cubin's registers and local memory (spills) with the bundled cuobjdump."""
        tool = os.path.join(
            os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"
        )
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(kernel)
            usage = subprocess.run(
                [tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True
            ).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
        registers, stack, local = (int(v) for v in m.groups())
        RESOURCES[name] = {"registers": registers, "spill_bytes": stack + local}
        return (
            1,
            1,
            registers,
            stack + local,
            1024,
        )  # module, function, registers, spills, max threads

    def unload_module(self, module):
        pass


class RecordingSm90Driver(DriverBase):
    """An active Triton driver for an H100 that records launches instead of performing them."""

    launcher_cls = _RecordingLauncher

    def __init__(self):
        self.utils = _Utils()

    @classmethod
    def is_active(cls):
        return True

    def map_python_to_cpp_type(self, ty):
        raise NotImplementedError

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _recording_ssim_triton():
    """kd_det's fused SSIM module, its kernels launched on the recording sm_90 driver."""
    driver.set_active(RecordingSm90Driver())
    from kd_det.losses import ssim_triton

    return ssim_triton


def main():
    ssim_triton = _recording_ssim_triton()
    x = torch.rand(2, 3, 20, 24, requires_grad=True)
    y = torch.rand(2, 3, 20, 24)
    loss = ssim_triton.fused_ssim_feature_loss(x, y, 11, 1.5, 0.01, 0.03, "minmax")
    loss.backward()
    print(json.dumps(LAUNCHES))


class _NoKernel:
    """What a compilation returns here: a kernel whose launch does nothing."""

    function = packed_metadata = None

    def launch_metadata(self, *args):
        return None

    def run(self, *args):
        pass


def training_level_sizes(
    short_edges=range(640, 801, 32), aspects=(4 / 3, 16 / 9, 3 / 4, 1.0), max_size=1333
):
    """(H, W) of FPN levels P2-P6 for images resized as Detectron2's ResizeShortestEdge and
    padded to a multiple of 32 (the FPN's size divisibility)."""
    sizes = set()
    for short in short_edges:
        for aspect in aspects:
            h, w = (short, short * aspect) if aspect >= 1 else (short / aspect, short)
            scale = min(1.0, max_size / max(h, w))
            h, w = int(h * scale + 0.5), int(w * scale + 0.5)
            h, w = -(-h // 32) * 32, -(-w // 32) * 32
            for stride in (4, 8, 16, 32, 64):
                sizes.add((-(-h // stride), -(-w // stride)))
    return sorted(sizes)


def compilations():
    """{kernel: distinct compilations} of the fused loss, forward and backward, over
    training_level_sizes()."""
    from triton.runtime.jit import JITFunction

    keys = {}

    def record_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        keys.setdefault(self.fn.__name__, set()).add(key)
        kernel = self.device_caches[device][0][key] = _NoKernel()
        return kernel

    JITFunction._do_compile = record_compile
    ssim_triton = _recording_ssim_triton()
    sizes = training_level_sizes()
    for h, w in sizes:
        # the backward in chunks of about 3 of the 7 planes: slices that start unaligned
        ssim_triton.BACKWARD_CHUNK_BYTES = 3 * 3 * 4 * h * (w + 20)
        x = torch.rand(1, 7, h, w, requires_grad=True)
        ssim_triton.fused_ssim_feature_loss(
            x, torch.rand(1, 7, h, w), 11, 1.5, 0.01, 0.03, "minmax"
        ).backward()
    print(
        json.dumps(
            {
                "level_sizes": len(sizes),
                "compilations": {k: len(v) for k, v in sorted(keys.items())},
            }
        )
    )


if __name__ == "__main__":
    (compilations if "--compilations" in sys.argv else main)()
