import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
try:
    import lanton  # noqa: F401  (installed package)
except ImportError:  # running from a checkout without `pip install ./jax_bindings`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jax_bindings"))
