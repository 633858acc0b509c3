"""Suite-wide safety and locations.

Every ROS process a test starts (in-process rclpy or a subprocess inheriting ``os.environ``) must
keep DDS discovery on this machine: the settings are forced here, before anything imports rclpy,
so running ``pytest`` directly is as safe as ``make test``.
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Every parameter of the published checkpoints with its shape (shared design folder).
STATE_DICT_SPEC = REPO_ROOT.parent / "shared" / "design" / "rnnpose_state_dict.json"

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(REPO_ROOT / "config" / "fastdds_localhost.xml")
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(100, 199)))
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")


#: 180° turns about x, y and z (BOP symmetries_discrete rows): the symmetry group of a box with three
#: different side lengths, such as :func:`symmetric_box_mesh`.
BOX_TURNS = [
    [1, 0, 0, 0, 0, -1, 0, 0, 0, 0, -1, 0, 0, 0, 0, 1],
    [-1, 0, 0, 0, 0, 1, 0, 0, 0, 0, -1, 0, 0, 0, 0, 1],
    [-1, 0, 0, 0, 0, -1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1],
]


def symmetric_box_mesh(units: float = 1.0, offset: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Any:
    """A 12 × 8 × 5 cm box (trimesh) subdivided to 5 mm edges whose vertex colours depend on |x|, |y|,
    |z| only: a texture with the box's own symmetry (:data:`BOX_TURNS`), for the refiner's image flow.
    Vertices in file units of ``units`` per metre, translated by ``offset`` (file units)."""
    import numpy as np
    import trimesh

    box = trimesh.creation.box(extents=(0.12, 0.08, 0.05))
    vertices, faces = trimesh.remesh.subdivide_to_size(box.vertices, box.faces, max_edge=0.005)
    a = np.abs(vertices)
    colours = np.stack(
        [
            128 + 110 * np.cos(a[:, 0] * 2 * math.pi / 0.03),
            128 + 110 * np.cos(a[:, 1] * 2 * math.pi / 0.025),
            128 + 110 * np.cos((a[:, 2] + a[:, 0]) * 2 * math.pi / 0.04),
        ],
        axis=1,
    ).astype(np.uint8)
    return trimesh.Trimesh(vertices * units + np.asarray(offset), faces, vertex_colors=colours, process=False)


def golden_dir() -> Path:
    """Fixtures of the published implementation: ``$RNNPOSE_GOLDEN_DIR`` or ``<repo>/../shared/golden``."""
    return Path(os.environ.get("RNNPOSE_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden"))


@pytest.fixture(scope="module")
def context() -> Iterator[Any]:
    """An rclpy context of the test module's own, in a DDS domain of its own."""
    import rclpy

    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=random.randint(150, 199))
    yield ctx
    rclpy.shutdown(context=ctx)


@pytest.fixture(scope="module")
def renderer():
    """An offscreen renderer per test module (an OpenGL context is slow to create). Not one per session:
    a plain pyrender OffscreenRenderer (test_environment uses one) terminates the process's EGL display
    when deleted, and with it every context made before."""
    from rnnpose_ros.core.render import Renderer

    return Renderer()


@pytest.fixture(scope="session")
def duck_registry():
    """A registry holding pybullet's textured duck alone; skips the test without pybullet_data."""
    from rnnpose_ros.core.objects import ObjectRegistry, load_pybullet_object, pybullet_mesh_available

    if not pybullet_mesh_available():
        pytest.skip("pybullet_data meshes not installed")
    return ObjectRegistry(models={"duck": load_pybullet_object("duck")})


@pytest.fixture
def golden() -> Path:
    """The golden fixture folder; skips the test (saying where it looked) when it is absent."""
    path = golden_dir()
    if not path.is_dir():
        pytest.skip(f"golden fixtures not found at {path} (set RNNPOSE_GOLDEN_DIR)")
    return path


def run_check_parity(golden: Path, *kinds: str) -> subprocess.CompletedProcess:
    """The CLI in its own process, so that its oneDNN kernel choice applies (see check_parity)."""
    only = [arg for kind in kinds for arg in ("--only", kind)]
    return subprocess.run(
        [sys.executable, "-m", "rnnpose_ros.tools.check_parity", str(golden), *only],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"},
    )
