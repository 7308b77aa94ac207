import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
try:
    import lanton  # noqa: F401  (installed package)
except ImportError:  # running from a checkout without `pip install ./jax_bindings`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jax_bindings"))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "heavy(seconds): a long test (about that many seconds alone on the 2-core development "
        "machine, 2026-12-07); run first, longest first, so that pytest-xdist's workers finish together")


def pytest_collection_modifyitems(config, items):
    """The heavy tests first, longest first; the others keep their order. With `-n 2 --dist load
    --maxschedchunk 2` (scripts/test.sh) each worker then takes the next long test as it frees up,
    instead of one worker inheriting a tail of them."""
    def weight(item):
        mark = item.get_closest_marker("heavy")
        return mark.args[0] if mark else 0
    items.sort(key=lambda item: -weight(item))  # stable: equal weights keep collection order
