"""Test-wide settings. XLA flags must be set before JAX is imported anywhere.

By default the tests run on the CPU with 8 simulated devices. With MEGALODON_TEST_PLATFORM set
(e.g. `gpu`), they run on that platform's real devices instead, e.g. the sharding tests over NCCL:

  MEGALODON_TEST_PLATFORM=gpu python3 -m pytest -q tests/test_sharding.py tests/test_sequence_parallel.py -m "not slow"
"""

import os

from megalodon_jax.xla_flags import add_xla_flags, cpu_flags

PLATFORM = os.environ.get("MEGALODON_TEST_PLATFORM", "").strip().lower()

if PLATFORM:
  # Real devices: no simulated host devices and no CPU-only flags; fail loudly if the platform is absent.
  # JAX expands the alias 'gpu' to cuda, rocm and oneapi and then fails on the absent ones: name CUDA.
  os.environ["JAX_PLATFORMS"] = {"gpu": "cuda"}.get(PLATFORM, PLATFORM)
else:
  # 8 simulated CPU devices for the sharding tests, and the CPU flags this jaxlib accepts.
  # -O0: the tests are mostly compilation of small programs, which -O0 makes 1.5-3x faster (the
  # programs run up to 2x slower, a good trade at test shapes). Subprocesses inherit the flags.
  add_xla_flags("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0", *cpu_flags())
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache shared by all tests (and xdist workers) of one run.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

if PLATFORM and PLATFORM != "cpu":
  # GPUs run float32 matmuls in TF32 by default (~1e-3 relative): the equality checks against
  # single-device values need full float32 on both sides.
  jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def rng():
  """A fresh numpy Generator per test, seeded by the test's name so failures reproduce."""
  import zlib
  name = os.environ.get("PYTEST_CURRENT_TEST", "seed")
  return np.random.default_rng(zlib.crc32(name.encode()))


@pytest.fixture
def host_without_hopper(monkeypatch):
  """The kernel dispatch a host without a Hopper GPU sees (the CPU in CI), on any host.

  Tests that count the Mosaic GPU calls in a lowered module leave the kernels they do not name on
  'auto'; on an H100/H200 (MEGALODON_TEST_PLATFORM=gpu) 'auto' picks Mosaic GPU for those too and
  the counts change."""
  from kernels_pallas import chunk_attention, timestep_norm_single_pass
  monkeypatch.setattr(chunk_attention, "_is_hopper", lambda: False)
  monkeypatch.setattr(timestep_norm_single_pass, "_on_hopper", lambda: False)


def pytest_report_header(config):
  precision = jax.config.jax_default_matmul_precision or "default"
  return (f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}, "
          f"float32 matmul precision: {precision}")


# Kernel tests lower the GPU kernels for CUDA on the CPU. jax 0.10.2 does that as it is; jax 0.11
# asks the device for its compute capability and, with no GPU, wants an abstract one set through an
# abstract mesh. These modules get an H100 (compute capability 9.0, as the H200) for every test.
_CUDA_LOWERING_MODULES = {
    "test_cema_kernel", "test_cema_summary_kernel", "test_chunk_attention_kernel", "test_decode_step_kernel",
    "test_timestep_norm_kernel", "test_timestep_norm_step_sums", "test_timestep_norm_single_pass",
    "test_block_matmul_mgpu", "test_bwd_tiles_mgpu", "test_scores_mgpu", "test_timestep_norm_mgpu",
    "test_timestep_norm_mgpu_bwd", "test_triton_backend"}
_ABSTRACT_GPU_KIND = "NVIDIA H100 80GB HBM3"


def _probe_kernel(x_ref, o_ref):
  o_ref[...] = x_ref[...] + 1.0


def _cuda_lowering_needs_abstract_gpu() -> bool:
  """Whether this jax, on the CPU, lowers a Triton kernel for CUDA only with an abstract GPU."""
  if jax.default_backend() != "cpu":
    return False
  from jax.experimental import pallas as pl
  from kernels_pallas.triton_backend import plgpu
  try:
    call = pl.pallas_call(_probe_kernel, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32),
                          compiler_params=plgpu.CompilerParams(num_warps=1))
    jax.jit(call).trace(jax.ShapeDtypeStruct((16,), jnp.float32)).lower(lowering_platforms=("cuda",))
  except RuntimeError as error:
    return "abstract GPU" in str(error)
  except Exception:  # noqa: BLE001 -- no Triton at all: nothing an abstract device would fix
    return False
  return False


_NEEDS_ABSTRACT_GPU = None


@pytest.fixture(autouse=True)
def _abstract_gpu_for_cuda_lowering(request):
  global _NEEDS_ABSTRACT_GPU
  if request.module.__name__.rsplit(".", 1)[-1] not in _CUDA_LOWERING_MODULES:
    yield
    return
  if _NEEDS_ABSTRACT_GPU is None:
    _NEEDS_ABSTRACT_GPU = _cuda_lowering_needs_abstract_gpu()
  if not _NEEDS_ABSTRACT_GPU:
    yield
    return
  from jax._src import mesh as mesh_lib  # AbstractDevice has no public name yet
  device = mesh_lib.AbstractDevice(device_kind=_ABSTRACT_GPU_KIND, num_cores=132, platform="gpu")
  with jax.sharding.use_abstract_mesh(mesh_lib.AbstractMesh((), (), abstract_device=device)):
    yield
