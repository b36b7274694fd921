"""CUDA without a GPU: what a CUDA build can be checked for offline.

* the default pipeline schedules every kernel (DLight): a CUDA module exists and every TIR
  function runs as thread-bound kernels; a build where some function would silently become CPU
  code is an error naming it;
* nvcc/ptxas accept every kernel for sm_80 and sm_90 with no register spills;
* the artifact's lib.so carries the kernels compiled (a fatbin, as TVM's loader will read it),
  not their CUDA source, so the GPU machine needs no nvcc.

Running the kernels needs a GPU: on a machine with one, the artifact is run and compared with
torch; here the runtime refuses it (no CUDA device), which is all that can be checked.
"""

from __future__ import annotations

import contextlib
import os
import struct

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax
from zoo import ZOO

import slimc
from slimc import runtime
from slimc.codegen import cuda
from slimc.codegen.build import to_relax
from slimc.codegen.targets import local_cuda_arch, resolve_target
from slimc.errors import ArtifactError, TargetError, UnsupportedError

ATOL = 1e-4
ARCHS = ["sm_80", "sm_90"]  # A100, H100


@pytest.fixture(scope="module")
def bert_cuda(tmp_path_factory):
    """The zoo's tiny BERT compiled for an H100 with the default (DLight) schedules, saved."""
    module, inputs, _ = ZOO["bert"]()
    g = slimc.capture(module, inputs)
    art = slimc.compile(g, "cuda", target_options={"arch": local_cuda_arch() or "sm_90"})
    return g, art, art.save(tmp_path_factory.mktemp("cuda") / "art")


def test_every_function_runs_as_thread_bound_kernels(bert_cuda):
    _, art, _ = bert_cuda
    kernels = cuda.verify_device_build(art.executable)
    source = cuda.device_source(art.executable)
    # every TIR function of the host module launches at least one kernel of its own
    functions = cuda._host_functions(art.executable)
    assert functions and all(any(k.startswith(f"{f}_kernel") for k in kernels)
                             for f in functions)
    assert len(kernels) >= len(functions)
    # DLight bound each to blocks and threads: launch bounds set, thread indices used
    assert all(threads >= 32 for threads in kernels.values()), kernels
    assert source.count('extern "C" __global__') == 2 * len(kernels)  # declared + defined
    meta = art.metadata["cuda"]
    assert meta["kernels"] == len(kernels) and meta["arch"] == art.device_code.arch


def test_ptxas_accepts_every_kernel_for_sm80_and_sm90_without_spills(bert_cuda):
    _, art, _ = bert_cuda
    binary, reports = cuda.compile_kernels(art.device_code.source, ARCHS)
    assert binary[:4] == b"\x50\xed\x55\xba"  # fatbin magic
    kernels = set(art.device_code.kernels)
    for arch in ARCHS:
        per_arch = {r.kernel: r for r in reports if r.arch == arch}
        assert set(per_arch) == kernels, f"ptxas did not report every kernel for {arch}"
        spilling = {k: (r.spill_stores, r.spill_loads) for k, r in per_arch.items()
                    if r.spill_stores or r.spill_loads}
        assert not spilling, f"{arch}: kernels spill registers: {spilling}"
        assert all(0 < r.registers <= 255 for r in per_arch.values())
        print(f"\n{arch}: {len(per_arch)} kernels, registers max "
              f"{max(r.registers for r in per_arch.values())}, spills 0, shared max "
              f"{max(r.shared_bytes for r in per_arch.values())} B")
    # the artifact's own build (its target's arch) reported no spills either
    assert art.metadata["cuda"]["spill_bytes"] == 0


def test_spill_check_can_fail():
    # a kernel holding 96 floats per thread under a 32-register cap (1024 threads, 2 blocks/SM)
    source = r"""
extern "C" __global__ void __launch_bounds__(1024, 2) spill_kernel(float* out, const float* in) {
  float acc[96];
  #pragma unroll
  for (int i = 0; i < 96; ++i) acc[i] = in[threadIdx.x * 96 + i];
  #pragma unroll
  for (int r = 0; r < 8; ++r) {
    #pragma unroll
    for (int i = 0; i < 96; ++i) acc[i] = acc[i] * acc[(i * 7 + r) % 96] + 1.0f;
  }
  #pragma unroll
  for (int i = 0; i < 96; ++i) out[threadIdx.x * 96 + i] = acc[i];
}
"""
    _, (report,) = cuda.compile_kernels(source, ["sm_80"], ptx=False)
    assert report.kernel == "spill_kernel" and report.arch == "sm_80"
    assert report.registers <= 32 and report.spill_stores > 0 and report.spill_loads > 0


@contextlib.contextmanager
def _stand_in(name: str, func):
    """TVM's global function ``name`` replaced by ``func`` for a while (registered or not)."""
    real = tvm_ffi.get_global_func(name, allow_missing=True)
    tvm_ffi.register_global_func(name, func, override=True)
    try:
        yield
    finally:
        if real is None:
            tvm_ffi.remove_global_func(name)
        else:
            tvm_ffi.register_global_func(name, real, override=True)


def _saved_cuda_module(lib_path) -> bytes:
    """The CUDA module's bytes in ``lib_path`` exactly as TVM's loader receives them: load the
    library with a stand-in for the CUDA loader (this TVM has none without a GPU driver)."""
    seen = []

    def capture(payload):
        seen.append(bytes(payload))
        return tvm_ffi.system_lib()  # any module: the kernels are not called

    with _stand_in("ffi.Module.load_from_bytes.cuda", capture):
        tvm.runtime.load_module(str(lib_path))
    assert len(seen) == 1, "the library should hold one CUDA module"
    return seen[0]


def test_artifact_holds_compiled_kernels_not_source(bert_cuda):
    _, art, out = bert_cuda
    lib = (out / runtime.LIBRARY_FILE).read_bytes()
    assert b'extern "C" __global__' not in lib  # no CUDA source to compile at load time
    payload = _saved_cuda_module(out / runtime.LIBRARY_FILE)
    fmt_len = struct.unpack_from("<Q", payload)[0]
    # TVM's loader compiles a module tagged "cuda" with NVRTC/nvcc; any other tag goes to
    # cuModuleLoadData as it is
    assert payload[8:8 + fmt_len] == b"cubin"
    binary = art.device_code.binary
    assert payload.endswith(struct.pack("<Q", len(binary)) + binary)
    assert binary[:4] == b"\x50\xed\x55\xba"
    meta = runtime.read_metadata(out)["cuda"]
    assert meta["binary_bytes"] == len(binary)
    assert meta["arch"] == art.device_code.arch == (local_cuda_arch() or "sm_90")


def test_runs_on_a_gpu_or_is_refused_without_one(bert_cuda):
    g, _, out = bert_cuda
    if local_cuda_arch() is None:
        with pytest.raises(ArtifactError, match="no CUDA GPU"):
            runtime.load(out)
    else:
        outputs = runtime.load(out)(*g.example_inputs)
        assert max(float(np.abs(o - r).max()) for o, r in zip(outputs, g.run())) < ATOL


# -- builds that would run on the CPU -------------------------------------------------------------
@pytest.fixture(scope="module")
def mha():
    module, inputs, _ = ZOO["mha"]()
    return slimc.capture(module, inputs)


def _claim_softmax_is_scheduled(mod, target):
    """A schedule hook that marks softmax scheduled without binding any thread: DLight then
    leaves it alone and TVM compiles it for the host, without a word."""
    mod = tvm.transform.Sequential([
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, tvm.tirx.PrimFunc) and gv.name_hint == "softmax":
            mod[gv] = func.with_attr("tirx.is_scheduled", True)
    return mod


def test_function_compiled_for_the_cpu_is_an_error(mha):
    with pytest.raises(UnsupportedError, match=r"compiled as CPU code \(softmax\)"):
        slimc.compile(mha, "cuda", target_options={"arch": "sm_80"},
                      tune=_claim_softmax_is_scheduled)


def test_build_without_schedules_is_an_error(mha):
    # TVM's plain build pipeline has no DLight: the whole "CUDA" build is host code
    mod, _, _ = to_relax(mha)
    executable = tvm.compile(mod, target=resolve_target("cuda", arch="sm_80"),
                             relax_pipeline="default_build")
    assert cuda.device_source(executable) is None
    with pytest.raises(UnsupportedError, match="no CUDA kernels"):
        cuda.verify_device_build(executable)


def test_build_keeps_source_where_tvm_would_compile_it(mha):
    # with the CUDA driver present, TVM's CUDA runtime registers this factory and compiles the
    # kernels during the build with NVRTC (the cuda-bindings package); slimc compiles them itself
    calls = []

    def nvrtc_build(code, fmt, fmap, source):
        calls.append(fmt)
        raise RuntimeError("NVRTC: cuda-bindings is not installed")

    before = os.environ.get("TVM_COMPILE_FORCE_FALLBACK")
    with _stand_in("ffi.Module.create.cuda", nvrtc_build):
        art = slimc.compile(mha, "cuda", target_options={"arch": "sm_80"})
    assert calls == [] and art.device_code.binary[:4] == b"\x50\xed\x55\xba"
    assert os.environ.get("TVM_COMPILE_FORCE_FALLBACK") == before


def test_nvcc_missing_or_arch_unknown(monkeypatch):
    with pytest.raises(TargetError, match="sm_XY"):
        cuda.compile_kernels("", ["ampere"])
    monkeypatch.setattr(cuda, "find_nvcc", lambda: None)
    with pytest.raises(TargetError, match="needs nvcc"):
        cuda.compile_kernels("", ["sm_80"])


# -- tuning for CUDA, offline: what can be checked before a GPU measures anything ------------------
def test_cuda_tuning_candidates_build_to_gpu_kernels(bert_cuda):
    """Every task's DLight baseline and a batch of candidates from MetaSchedule's GPU search space
    build (as tune() builds them) into modules with CUDA kernels; measuring them needs the GPU
    (bench/gpu_cuda.py ran that on an H200)."""
    import tarfile

    from tvm.s_tir import meta_schedule as ms

    from slimc.codegen import tune as T
    g, _, _ = bert_cuda
    target = T._with_gpu_limits(resolve_target("cuda", arch="sm_90"))
    assert int(target.attrs["max_threads_per_block"]) == 1024
    mod, _, _ = to_relax(g)
    tasks = ms.relax_integration.extract_tasks(T.prepare(mod, target), target)
    builder = T.InProcessBuilder()
    try:
        seeds = [T.dlight_schedule(t.dispatched[0], target) for t in tasks]
        assert all(s is not None for s in seeds), "DLight schedules every kernel"
        built = builder.build([ms.builder.BuilderInput(s.mod, target) for s in seeds])
        assert [b.error_msg for b in built] == [None] * len(tasks)

        matmul = max(tasks, key=lambda t: float(tvm.s_tir.analysis.estimate_tir_flops(
            t.dispatched[0])))
        ctx = T._tune_context(matmul, target, seed=0, integer=False, evolve=False)
        ctx.pre_tuning(max_trials=8, num_trials_per_iter=8,
                       design_spaces=ctx.space_generator.generate_design_space(ctx.mod))
        candidates = ctx.generate_measure_candidates()
        assert len(candidates) == 8
        built += builder.build([ms.builder.BuilderInput(c.sch.mod, target) for c in candidates])
        assert all(b.error_msg is None for b in built), [b.error_msg for b in built]
        # each artifact carries device code next to its host object (packed imports)
        for b in built:
            with tarfile.open(b.artifact_path) as tar:
                assert any("devc" in n for n in tar.getnames()), tar.getnames()
        # the candidates differ from DLight's schedule and from each other
        traces = {str(c.sch.trace) for c in candidates}
        assert len(traces) > 1
    finally:
        builder.cleanup()
