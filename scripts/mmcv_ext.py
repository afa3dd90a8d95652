"""Compile mmcv 1.7.2's own CPU kernels for NMS and RoIAlign and register them as ``mmcv._ext``.

mmcv is installed without compiled ops (``MMCV_WITH_OPS=0``). This module compiles, with
``torch.utils.cpp_extension.load``, the upstream C++ sources verbatim from an mmcv v1.7.2 source tree:

* ``mmcv/ops/csrc/pytorch/nms.cpp`` + ``cpu/nms.cpp``            -> ``nms``, ``softnms``, ``nms_match``
* ``mmcv/ops/csrc/pytorch/roi_align.cpp`` + ``cpu/roi_align.cpp`` -> ``roi_align_forward``, ``roi_align_backward``

with a small pybind file whose ``m.def`` lines (names and keyword argument names) are copied from mmcv's
``csrc/pytorch/pybind.cpp``, so ``mmcv/ops/nms.py`` and ``mmcv/ops/roi_align.py`` call them unchanged through
``ext_module``. Every other op name of ``mmcv._ext`` resolves to a stub that raises ``NotImplementedError`` when
called (``mmcv.ops`` asks for many names at import time).

Call before anything imports ``mmcv.ops`` (mmdet imports it)::

    import sys; sys.path.insert(0, "/tmp/forkcmp")
    from mmcv_ext import register_mmcv_ext
    register_mmcv_ext("/tmp/forkcmp/mmcv-src", "/tmp/forkcmp/build-ext")
    import mmdet.apis   # mmcv.ops.nms / batched_nms / RoIAlign / roi_align now run upstream's C++
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

PYBIND = r"""
#include <torch/extension.h>
#include "pytorch_cpp_helper.hpp"

Tensor nms(Tensor boxes, Tensor scores, float iou_threshold, int offset);
Tensor softnms(Tensor boxes, Tensor scores, Tensor dets, float iou_threshold,
               float sigma, float min_score, int method, int offset);
std::vector<std::vector<int>> nms_match(Tensor dets, float iou_threshold);

void roi_align_forward(Tensor input, Tensor rois, Tensor output,
                       Tensor argmax_y, Tensor argmax_x, int aligned_height,
                       int aligned_width, float spatial_scale,
                       int sampling_ratio, int pool_mode, bool aligned);

void roi_align_backward(Tensor grad_output, Tensor rois, Tensor argmax_y,
                        Tensor argmax_x, Tensor grad_input, int aligned_height,
                        int aligned_width, float spatial_scale,
                        int sampling_ratio, int pool_mode, bool aligned);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nms", &nms, "nms (CPU/CUDA) ", py::arg("boxes"), py::arg("scores"),
        py::arg("iou_threshold"), py::arg("offset"));
  m.def("softnms", &softnms, "softnms (CPU) ", py::arg("boxes"),
        py::arg("scores"), py::arg("dets"), py::arg("iou_threshold"),
        py::arg("sigma"), py::arg("min_score"), py::arg("method"),
        py::arg("offset"));
  m.def("nms_match", &nms_match, "nms_match (CPU) ", py::arg("dets"),
        py::arg("iou_threshold"));
  m.def("roi_align_forward", &roi_align_forward, "roi_align forward",
        py::arg("input"), py::arg("rois"), py::arg("output"),
        py::arg("argmax_y"), py::arg("argmax_x"), py::arg("aligned_height"),
        py::arg("aligned_width"), py::arg("spatial_scale"),
        py::arg("sampling_ratio"), py::arg("pool_mode"), py::arg("aligned"));
  m.def("roi_align_backward", &roi_align_backward, "roi_align backward",
        py::arg("grad_output"), py::arg("rois"), py::arg("argmax_y"),
        py::arg("argmax_x"), py::arg("grad_input"), py::arg("aligned_height"),
        py::arg("aligned_width"), py::arg("spatial_scale"),
        py::arg("sampling_ratio"), py::arg("pool_mode"), py::arg("aligned"));
}
"""

# copied verbatim, under names that do not collide (both folders hold an nms.cpp and a roi_align.cpp)
VERBATIM = {"nms.cpp": "pytorch/nms.cpp", "nms_cpu.cpp": "pytorch/cpu/nms.cpp",
            "roi_align.cpp": "pytorch/roi_align.cpp", "roi_align_cpu.cpp": "pytorch/cpu/roi_align.cpp"}
COMPILED = ("nms", "softnms", "nms_match", "roi_align_forward", "roi_align_backward")


def register_mmcv_ext(mmcv_src, build_dir, verbose: bool = False) -> types.ModuleType:
    """Compile (cached in ``build_dir``) and install ``sys.modules["mmcv._ext"]``; returns the shim module."""
    if "mmcv.ops" in sys.modules and "mmcv._ext" not in sys.modules:
        raise RuntimeError("register_mmcv_ext must run before mmcv.ops is imported")
    from torch.utils.cpp_extension import load

    csrc = Path(mmcv_src) / "mmcv" / "ops" / "csrc"
    build_dir = Path(build_dir)
    for needed in (*VERBATIM.values(), "common/pytorch_cpp_helper.hpp", "common/pytorch_device_registry.hpp"):
        if not (csrc / needed).is_file():
            raise FileNotFoundError(f"{mmcv_src} has no mmcv/ops/csrc/{needed}: give an mmcv v1.7.2 source tree")
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = {"mmcv_ext_pybind.cpp": PYBIND, **{f: (csrc / src).read_text() for f, src in VERBATIM.items()}}
    for file, text in sources.items():  # rewrite only on change, so load() reuses its build
        if not (build_dir / file).exists() or (build_dir / file).read_text() != text:
            (build_dir / file).write_text(text)
    ext = load(name="mmcv_nms_roi_align_ext", sources=[str(build_dir / f) for f in sources],
               extra_include_paths=[str(csrc / "common")], extra_cflags=["-O2", "-DMMCV_WITH_CPU"],
               build_directory=str(build_dir), verbose=verbose)

    shim = types.ModuleType("mmcv._ext")
    shim.__file__ = ext.__file__
    for name in COMPILED:
        setattr(shim, name, getattr(ext, name))

    def missing(name):
        def stub(*args, **kwargs):
            raise NotImplementedError(f"mmcv op {name} was not compiled (only {', '.join(COMPILED)} are)")
        stub.__name__ = name
        return stub

    def module_getattr(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return missing(name)

    shim.__getattr__ = module_getattr
    sys.modules["mmcv._ext"] = shim
    return shim
