"""Every third-party import of the package has a ``package.xml`` key and a pinned requirement.

The imports are read from the code (AST of ``rnnpose_ros/``, ``launch/``, ``test/``), including modules
named as strings to ``pytest.importorskip`` / ``importlib.util.find_spec`` / ``importlib.import_module``
and Python packages named by ``pkg://`` URIs in code and ``config/``, so a new import without its
dependency fails here rather than at a user's ``rosdep install`` + ``ros2 launch``. Each module maps to
its rosdep key (``exec_depend`` for code of the package, ``exec_depend`` or ``test_depend`` for tests)
and to the PyPI distribution pinned in ``requirements/`` — or to the reason no pin exists. The map is
checked against what is installed (``importlib.metadata``), and every key of ``package.xml`` must be
used, so a stale key (as ``cv_bridge`` was) fails too.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("rnnpose_ros", "launch", "test")
# The package and the test modules (tests import helpers of other test modules).
FIRST_PARTY = {"rnnpose_ros"} | {path.stem for path in (REPO / "test").glob("*.py")}
RUNTIME_REQUIREMENTS = ("core.txt", "ros.txt", "torch-cpu.txt")
TEST_REQUIREMENTS = ("dev.txt",)
_STRING_IMPORTERS = {"importorskip", "find_spec", "import_module"}
_PKG_URI = re.compile(r"pkg://([A-Za-z_][A-Za-z0-9_]*)/")

# Why a module has no pin in requirements/ (it cannot be installed from PyPI in this set-up).
NOT_ON_PYPI_GENERATED = "generated from interfaces/ by `make setup` on wheel installs (interfaces/README.md)"
NOT_ON_PYPI_OPTIONAL = "not on PyPI: imported when present, ros/compat.py stands in on wheel installs"
NOT_ON_PYPI_LAUNCH = "not on PyPI: wheel installs start refine_node without launch (README)"

#: import name -> (rosdep key, PyPI distribution pinned in requirements/ or the reason there is none).
DEPENDENCIES: dict[str, tuple[str, str | None, str]] = {
    # ROS 2 packages
    "rclpy": ("rclpy", "ros-rclpy", ""),
    "builtin_interfaces": ("builtin_interfaces", "ros-builtin-interfaces", ""),
    "rcl_interfaces": ("rcl_interfaces", "ros-rcl-interfaces", ""),
    "std_msgs": ("std_msgs", "ros-std-msgs", ""),
    "sensor_msgs": ("sensor_msgs", "ros-sensor-msgs", ""),
    "geometry_msgs": ("geometry_msgs", "ros-geometry-msgs", ""),
    "visualization_msgs": ("visualization_msgs", "ros-visualization-msgs", ""),
    "diagnostic_msgs": ("diagnostic_msgs", "ros-diagnostic-msgs", ""),
    "rosgraph_msgs": ("rosgraph_msgs", "ros-rosgraph-msgs", ""),
    "ament_index_python": ("ament_index_python", "ros-ament-index-python", ""),
    "vision_msgs": ("vision_msgs", None, NOT_ON_PYPI_GENERATED),
    "tf2_msgs": ("tf2_msgs", None, NOT_ON_PYPI_GENERATED),
    "rnnpose_ros_interfaces": ("rnnpose_ros_interfaces", None, NOT_ON_PYPI_GENERATED),
    "lifecycle_msgs": ("lifecycle_msgs", "ros-lifecycle-msgs", ""),
    "tf2_ros": ("tf2_ros", None, NOT_ON_PYPI_OPTIONAL),
    "message_filters": ("message_filters", None, NOT_ON_PYPI_OPTIONAL),
    "launch": ("launch", None, NOT_ON_PYPI_LAUNCH),
    "launch_ros": ("launch_ros", None, NOT_ON_PYPI_LAUNCH),
    "launch_testing": ("launch_testing", None, NOT_ON_PYPI_LAUNCH),
    # Python libraries
    "numpy": ("python3-numpy", "numpy", ""),
    "scipy": ("python3-scipy", "scipy", ""),
    "cv2": ("python3-opencv", "opencv-python-headless", ""),
    "yaml": ("python3-yaml", "PyYAML", ""),
    "torch": ("python3-torch", "torch", ""),
    "PIL": ("python3-pil", "pillow", ""),
    "OpenGL": ("python3-opengl", "PyOpenGL", ""),
    "matplotlib": ("python3-matplotlib", "matplotlib", ""),
    "imageio": ("python3-imageio", "imageio", ""),
    "tqdm": ("python3-tqdm", "tqdm", ""),
    "warp": ("python3-warp-lang-pip", "warp-lang", ""),
    "tensorboard": ("python3-tensorboard-pip", "tensorboard", ""),
    "skimage": ("python3-skimage", "scikit-image", ""),
    "trimesh": ("python3-trimesh-pip", "trimesh", ""),
    "pyrender": ("python3-pyrender-pip", "pyrender", ""),
    "pybullet_data": ("python3-pybullet-pip", "pybullet", ""),
    "hypothesis": ("python3-hypothesis", "hypothesis", ""),
    "pytest": ("python3-pytest", "pytest", ""),
}
#: modules the package's code uses only when installed (guarded), so a test_depend suffices, and why.
OPTIONAL_AT_RUNTIME = {
    "pybullet_data": "objects.load_pybullet_object (test meshes), behind pybullet_mesh_available(); "
    "the default duck ships in meshes/",
}
#: package.xml keys that no import names, and why they are needed all the same.
USED_WITHOUT_IMPORT = {"rviz2": "started by launch/refine.launch.py (use_rviz:=true)"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def scan_imports() -> dict[str, set[str]]:
    """Top-level third-party module -> the files (relative to the repository) that import it (``pkg://``
    URIs only from the package's code and config: tests name packages that do not exist on purpose)."""
    found: dict[str, set[str]] = defaultdict(set)
    for folder in SCANNED:
        for path in sorted((REPO / folder).rglob("*.py")):
            where = path.relative_to(REPO).as_posix()
            for name in _imports_of(ast.parse(path.read_text(encoding="utf-8"), where)):
                found[name].add(where)
    for path in sorted((REPO / "rnnpose_ros").rglob("*.py")):  # tests name missing packages on purpose
        for name in _PKG_URI.findall(path.read_text(encoding="utf-8")):
            found[name].add(path.relative_to(REPO).as_posix())
    for path in sorted((REPO / "config").glob("*.yaml")):
        for name in _PKG_URI.findall(path.read_text(encoding="utf-8")):
            found[name].add(path.relative_to(REPO).as_posix())
    return {
        name: files
        for name, files in found.items()
        if name not in sys.stdlib_module_names and name not in FIRST_PARTY and name != "__future__"
    }


def _imports_of(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = (
                node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            )
            if function in _STRING_IMPORTERS and isinstance(node.args[0].value, str):
                names.add(node.args[0].value.split(".")[0])
    return names


def package_xml_keys() -> dict[str, set[str]]:
    """Dependency tag (exec_depend, test_depend, ...) -> keys of ``package.xml``."""
    keys: dict[str, set[str]] = defaultdict(set)
    for element in ET.parse(REPO / "package.xml").getroot():
        if element.tag.endswith("depend") and element.text:
            keys[element.tag].add(element.text.strip())
    return keys


def pinned(files: tuple[str, ...]) -> dict[str, str]:
    """Canonical distribution name -> pinned version, from ``requirements/<files>``."""
    pins = {}
    for name in files:
        for line in (REPO / "requirements" / name).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                assert "==" in line, f"requirements/{name}: {line!r} is not pinned with =="
                distribution, version = line.split("==", 1)
                pins[_canonical(distribution)] = version.strip()
    return pins


IMPORTS = scan_imports()


def _is_runtime(module: str, files: set[str]) -> bool:
    """Whether the installed package needs ``module`` (imported outside test/ and not optional)."""
    return module not in OPTIONAL_AT_RUNTIME and any(not f.startswith("test/") for f in files)


def test_every_import_has_a_package_xml_key() -> None:
    keys = package_xml_keys()
    runtime_keys = keys["exec_depend"] | keys["depend"]
    test_keys = runtime_keys | keys["test_depend"]
    problems = []
    for module, files in sorted(IMPORTS.items()):
        if module not in DEPENDENCIES:
            problems.append(f"{module} (imported by {', '.join(sorted(files))}) has no entry in DEPENDENCIES")
            continue
        key = DEPENDENCIES[module][0]
        runtime = _is_runtime(module, files)
        if key not in (runtime_keys if runtime else test_keys):
            tag = "exec_depend" if runtime else "test_depend"
            problems.append(f"{module}: package.xml lacks <{tag}>{key}</{tag}> ({', '.join(sorted(files))})")
    assert not problems, "\n".join(problems)


def test_every_import_is_pinned_in_requirements() -> None:
    runtime_pins = pinned(RUNTIME_REQUIREMENTS)
    all_pins = runtime_pins | pinned(TEST_REQUIREMENTS)
    constraints = pinned(("constraints.txt",))
    problems = []
    for module, files in sorted(IMPORTS.items()):
        if module not in DEPENDENCIES:
            continue  # reported by the package.xml test
        _, distribution, reason = DEPENDENCIES[module]
        if distribution is None:
            assert reason, f"{module}: no distribution and no reason"
            continue
        runtime = _is_runtime(module, files)
        pins = runtime_pins if runtime else all_pins
        name = _canonical(distribution)
        if name not in pins:
            where = "core.txt / ros.txt" if runtime else "a requirements file"
            problems.append(f"{module}: {distribution} is not pinned in {where}")
        elif constraints.get(name, pins[name]) != pins[name]:
            problems.append(f"{distribution}: {pins[name]} != constraints.txt {constraints[name]}")
    assert not problems, "\n".join(problems)


def test_the_map_names_the_installed_distributions() -> None:
    """Where a module is installed, the distribution the map names is the one that provides it."""
    providers = importlib.metadata.packages_distributions()
    checked = 0
    for module, (_, distribution, _) in DEPENDENCIES.items():
        if distribution is None or module not in providers:
            continue
        checked += 1
        assert _canonical(distribution) in {_canonical(d) for d in providers[module]}, (
            f"{module} is provided by {providers[module]}, not {distribution}"
        )
    if checked == 0:
        pytest.skip("none of the mapped modules is installed")


def test_no_package_xml_key_is_unused() -> None:
    used = {DEPENDENCIES[module][0] for module in IMPORTS if module in DEPENDENCIES}
    keys = package_xml_keys()
    declared = keys["exec_depend"] | keys["depend"] | keys["test_depend"]
    unused = sorted(declared - used - set(USED_WITHOUT_IMPORT))
    assert not unused, (
        f"package.xml keys nothing imports (remove them or say why in USED_WITHOUT_IMPORT): {unused}"
    )


def test_the_scan_sees_imports_of_every_kind() -> None:
    """The scanner itself: plain, from- and string imports (relative ones ignored), and pkg:// URIs of the
    package's code (objects.py names pybullet_data only so)."""
    source = (
        "import numpy.linalg\nfrom cv2 import imread\nfrom . import sibling\nimport json\n"
        "pytest.importorskip('rclpy')\nimportlib.util.find_spec('skimage.data')\n"
    )
    assert _imports_of(ast.parse(source)) == {"numpy", "cv2", "json", "rclpy", "skimage"}
    assert {"numpy", "torch", "rclpy", "ament_index_python", "skimage", "pybullet_data"} <= set(IMPORTS)
