"""Mosaic GPU's CPU interpreter, completed for our kernels (a pytest fixture factory).

jax 0.10.2 can run a Pallas Mosaic GPU kernel on the CPU (`plgpu.kernel(..., interpret=params)`):
each warpgroup is a thread, and barriers, TMA copies and wgmma are simulated, with a race
detector. Some things our kernels use are missing there, and `mosaic_gpu_interpreter` supplies
them for one test's duration:
  * wgmma on an operand read through `plgpu.transpose_ref` (the interpreter's wgmma callback
    rejects the transposed view; here the view is read plainly and transposed in numpy);
  * wgmma with its A operand in registers (an array, not a shared-memory ref: jax's callback takes
    every operand for an allocation key);
  * `plgpu.load` of shared memory with a register layout (a plain load here);
  * a CPU rule for `layout_cast` (the identity: layouts are register arrangements);
  * race checks on wgmma's shared-memory operands (jax's wgmma callback reads them unchecked, so a
    TMA refilling a slot that a wgmma still reads went unseen);
  * predicated TMA stores (`copy_smem_to_gmem(..., predicate=p)`, which `plgpu.emit_pipeline` issues
    for its outputs): the store happens where p holds.
It runs wgmma synchronously, so it checks the barrier protocol, TMA offsets, indexing, masks and
epilogues, not the asynchronous wgmma waits. The modules are private: on a jax that lays them
out differently the fixture fails with the import error (the GPU tests then remain).
"""

from __future__ import annotations

import faulthandler

import jax
import numpy as np
import pytest

# A deadlocked barrier protocol would hang the test run: dump the stacks and exit instead.
_DEADLOCK_SECONDS = 300


def mosaic_gpu_interpreter(monkeypatch):
  """Yields (InterpretGPUParams with race detection, the gpu_callbacks module for get_races())."""
  if jax.default_backend() != "cpu":
    # Interpreter-only: the compiled kernels have their own tests (marked gpu) for GPU runs.
    pytest.skip("the Mosaic GPU interpreter runs on the CPU backend (this test runs in the CPU suite)")
  from jax._src.pallas.mosaic.interpret import utils as interpret_utils
  from jax._src.pallas.mosaic_gpu import core as gpu_core
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  from jax._src.state import types as state_types
  from jax.experimental.pallas import mosaic_gpu as plgpu
  from jax.interpreters import mlir

  mlir.register_lowering(gpu_core.layout_cast_p, mlir.lower_fun(lambda x, new_layout: x, multiple_results=False),
                         platform="cpu")

  def read(memory, key, transforms, thread, info):
    if np.ndim(key) == 2:  # an operand in registers arrives as its value (keys are 1-D integer arrays)
      return np.asarray(key)
    transforms = gpu_callbacks._remove_noop_transforms(transforms)
    permutation = None
    if transforms and isinstance(transforms[-1], state_types.TransposeTransform):
      permutation, transforms = transforms[-1].permutation, transforms[:-1]
    span = interpret_utils.to_range(jax.tree.map(int, transforms))
    key = gpu_callbacks.HostAllocationKey.from_array(key)
    value, _, clock = memory.get_buffer_content(key, span, thread, logging_info=info)
    if memory.detect_races:  # (jax's own wgmma callback reads its operands unchecked)
      gpu_callbacks.get_races().check_read(info.device_id, info.thread_id, clock, key, span,
                                           source_info=info.source_info)
    return value if permutation is None else np.transpose(value, permutation)

  def wgmma(*, token, device_id, grid_point_coords, thread_id, acc_allocation_key_as_array, acc_transforms,
            acc_dtype, a_allocation_key_as_array, a_transforms, b_allocation_key_as_array, b_transforms,
            source_info=None):
    """The interpreter's wgmma (synchronous: acc += a @ b), also for transposed operands."""
    memory = gpu_callbacks._get_shared_memory()
    thread = memory.get_global_thread_id(int(device_id), int(thread_id))
    info = interpret_utils.GPULoggingInfo(device_id=int(device_id), thread_id=int(thread_id),
                                          grid_point_coords=tuple(int(x) for x in grid_point_coords),
                                          source_info=source_info)
    a = read(memory, a_allocation_key_as_array, a_transforms, thread, info)
    b = read(memory, b_allocation_key_as_array, b_transforms, thread, info)
    acc_key = gpu_callbacks.HostAllocationKey.from_array(acc_allocation_key_as_array)
    span = interpret_utils.to_range(jax.tree.map(int, gpu_callbacks._remove_noop_transforms(acc_transforms)))
    acc, _, _ = memory.get_buffer_content(acc_key, span, thread, logging_info=info)
    memory.store_buffer_content(acc_key, span, acc + np.matmul(a, b, dtype=acc_dtype), thread, logging_info=info)
    return token

  def load(src, idx=(), *, layout=None, optimized=True):
    del optimized
    value = src[...] if idx == () else src[idx]
    return value if layout is None else gpu_core.layout_cast(value, layout)

  copy_smem_to_gmem = gpu_callbacks.copy_smem_to_gmem

  def predicated_copy_smem_to_gmem(*, token, predicate, **kwargs):
    if predicate is not None and not bool(np.asarray(predicate)):
      return token
    return copy_smem_to_gmem(token=token, predicate=None, **kwargs)

  monkeypatch.setattr(gpu_callbacks, "wgmma", wgmma)
  monkeypatch.setattr(gpu_callbacks, "copy_smem_to_gmem", predicated_copy_smem_to_gmem)
  monkeypatch.setattr(plgpu, "load", load)
  faulthandler.dump_traceback_later(_DEADLOCK_SECONDS, exit=True)
  try:
    yield InterpretGPUParams(detect_races=True), gpu_callbacks
  finally:
    faulthandler.cancel_dump_traceback_later()
    gpu_callbacks.reset_gpu_interpret_mode_state()
