"""Files shipped with the package (``config/``), found the same way in every install layout.

Kept free of ROS imports: the demo looks up its Fast DDS profile before anything imports rclpy.
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGE = "rnnpose_ros"


def package_config_file(name: str) -> Path | None:
    """``config/<name>`` of this package, or None: the source tree when running from one (its copy is
    the current one), else the package share directory (``ament_index`` on a ROS 2 installation,
    ``<prefix>/share/rnnpose_ros`` for a pip install)."""
    candidates = [Path(__file__).resolve().parents[1] / "config" / name]
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory(PACKAGE)) / "config" / name)
    except (ImportError, LookupError, OSError):
        pass  # pip-only install: no ament index (or AMENT_PREFIX_PATH unset)
    candidates.append(Path(sys.prefix) / "share" / PACKAGE / "config" / name)
    return next((c for c in candidates if c.is_file()), None)


def default_objects_file() -> Path:
    """The package's ``config/objects.yaml`` (:func:`package_config_file`); if absent, the source-tree
    path, so that the error names where it was expected."""
    return (
        package_config_file("objects.yaml") or Path(__file__).resolve().parents[1] / "config" / "objects.yaml"
    )
