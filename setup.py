"""ament_python package definition: `colcon build` on a ROS 2 distribution, `pip install -e .` in the venv."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "rnnpose_ros"


def shared(folder: str, pattern: str = "*") -> tuple[str, list[str]]:
    """Install ``folder/pattern`` files under ``share/rnnpose_ros/folder``."""
    return (f"share/{PACKAGE}/{folder}", [p for p in glob(f"{folder}/{pattern}") if not p.endswith(".md")])


setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        shared("launch", "*.py"),
        shared("config", "*.*"),
        shared("meshes"),
        shared("models"),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="rnnpose_ros maintainers",
    maintainer_email="maintainers@rnnpose-ros.invalid",
    description="RNNPose 6-DoF object pose refinement as a ROS 2 node",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "refine_node = rnnpose_ros.ros.node:main",
            "scene_player = rnnpose_ros.ros.scene_player:main",
        ],
    },
)
