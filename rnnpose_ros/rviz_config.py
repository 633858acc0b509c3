"""The shipped rviz configuration made to follow a namespace (kept free of ROS imports: the launch file
and the tests use it).

``config/rnnpose.rviz`` names the node's topics relatively (``rnnpose_refiner/markers``), so rviz2
started inside the node's namespace shows that node's output. Whether a display resolves a relative
topic against rviz2's own namespace is up to each display plugin, so the launch file does not rely on
it: it writes a copy with every relative ``rnnpose_refiner/...`` topic made absolute under the
namespace (``/robot1/rnnpose_refiner/markers``) and starts rviz2 with that copy.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

NODE_NAME = "rnnpose_refiner"
_RELATIVE_TOPIC = re.compile(rf"^(\s*Value:\s*){NODE_NAME}/", flags=re.MULTILINE)


def namespaced_rviz_config(text: str, namespace: str) -> str:
    """``text`` (an .rviz file) with each relative ``rnnpose_refiner/<topic>`` value made absolute
    under ``namespace`` ("" or "/" = the root); absolute topics and everything else are kept."""
    parts = [p for p in namespace.split("/") if p]
    prefix = "/" + "".join(f"{p}/" for p in parts)
    return _RELATIVE_TOPIC.sub(lambda m: f"{m.group(1)}{prefix}{NODE_NAME}/", text)


def write_namespaced_rviz_config(source: Path, namespace: str) -> Path:
    """Write :func:`namespaced_rviz_config` of the file ``source`` to a new temporary file; its path."""
    folder = Path(tempfile.mkdtemp(prefix="rnnpose_rviz_"))
    target = folder / Path(source).name
    target.write_text(namespaced_rviz_config(Path(source).read_text(encoding="utf-8"), namespace))
    return target
