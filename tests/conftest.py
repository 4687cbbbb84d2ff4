"""Test session setup: 8 simulated CPU devices and one persistent JIT cache for all workers.

Both must be configured before JAX initialises its backend, hence at import of this file.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import hypothesis  # noqa: E402

_CACHE = pathlib.Path(__file__).resolve().parents[1] / ".jax_cache"
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

hypothesis.settings.register_profile("alignax", deadline=None, max_examples=25, derandomize=True,
                                     print_blob=True)
hypothesis.settings.load_profile("alignax")
