"""Resource URIs of ``objects.yaml`` (meshes, weights) and the URI rviz needs to load a mesh elsewhere.

Accepted forms of a resource::

    package://<ros package>/<path>   the package's share directory (ament index), as in URDF and rviz
    file:///<absolute path>          a file URI (percent-escapes decoded)
    pkg://<python package>/<path>    an installed Python package's folder (found with importlib)
    <path>                           absolute, or relative to the YAML file's folder

Any other ``<scheme>://`` is an error (:class:`UriError`) naming the scheme: such a string used to be
taken silently as a relative path, which only failed later with a "file not found" for a path nobody
wrote.

``package://rnnpose_ros/...`` resolves to this source tree when the code runs from one (its
``meshes/``, ``config/`` and ``models/`` are what the install copies to the share directory), so the
default configuration works before ``colcon build`` and in the pip venv.

ament_index_python is a plain Python library (no rclpy); it is imported on first use so that the
engine also runs where it is absent (then only ``package://`` URIs fail, with a message saying why).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

PACKAGE_SCHEME = "package://"
FILE_SCHEME = "file://"
PKG_SCHEME = "pkg://"
SCHEMES = (PACKAGE_SCHEME, FILE_SCHEME, PKG_SCHEME)
# The folders setup.py installs to share/rnnpose_ros, which package://rnnpose_ros/ may name.
_OWN_PACKAGE = "rnnpose_ros"
_OWN_SOURCE_ROOT = Path(__file__).resolve().parents[2]
_OWN_SHARED_FOLDERS = ("config", "meshes", "models", "launch")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class UriError(ValueError):
    """A resource URI that cannot be resolved (the message names the URI, the scheme or package, and why)."""


def uri_scheme(spec: str) -> str | None:
    """The ``<scheme>`` of ``<scheme>://...`` (lower case), or None for a plain path."""
    match = _SCHEME.match(spec)
    return match.group(1).lower() if match else None


def resolve_uri(spec: str, base_dir: Path) -> Path:
    """The absolute file path ``spec`` names (forms in the module docstring); does not check that it exists.

    Symbolic links are kept (``..`` is folded): with ``colcon build --symlink-install`` the share
    directory's files link into the source tree, and the share path is what names the package again
    for a viewer (:func:`display_uri`).

    Raises:
        UriError: unknown scheme, malformed URI, or a package that cannot be found.
    """
    scheme = uri_scheme(spec)
    if scheme is None:
        path = Path(spec).expanduser()
        return Path(os.path.abspath(path if path.is_absolute() else base_dir / path))
    if scheme == "package":
        package, inner = _package_and_path(spec, "package://<ros package>/<path inside its share directory>")
        return Path(os.path.abspath(ros_package_share(package, spec) / inner))
    if scheme == "pkg":
        package, inner = _package_and_path(spec, "pkg://<python package>/<path inside it>")
        return (python_package_root(package, spec) / inner).resolve()
    if scheme == "file":
        parsed = urlparse(spec)
        if parsed.netloc not in ("", "localhost"):
            raise UriError(f"{spec!r}: file:// URI of another host ({parsed.netloc!r}); use file:///<path>")
        path = Path(unquote(parsed.path))
        if not path.is_absolute():
            raise UriError(f"{spec!r}: a file:// URI needs an absolute path (file:///<path>)")
        return path.resolve()
    raise UriError(
        f"{spec!r}: unknown URI scheme {scheme + '://'!r}; supported: {', '.join(SCHEMES)} "
        "or a plain path (absolute or relative to the YAML file)"
    )


def _package_and_path(spec: str, form: str) -> tuple[str, str]:
    rest = spec.split("://", 1)[1]
    package, _, inner = rest.partition("/")
    if not package or not inner:
        raise UriError(f"{spec!r}: expected {form}")
    return package, inner


def ros_package_share(package: str, spec: str = "") -> Path:
    """Share directory of ROS package ``package`` (the ament index; this source tree for rnnpose_ros
    when running from one). Raises UriError naming the package and how to make it findable."""
    where = f"{spec!r}: " if spec else ""
    if package == _OWN_PACKAGE and _running_from_source():
        return _OWN_SOURCE_ROOT
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    except ImportError:
        raise UriError(
            f"{where}package:// needs ament_index_python (install it, or source a ROS 2 setup)"
        ) from None
    try:
        return Path(get_package_share_directory(package))
    except PackageNotFoundError:
        raise UriError(
            f"{where}ROS package {package!r} is not in the ament index (AMENT_PREFIX_PATH): build and "
            "source its workspace"
        ) from None
    except (LookupError, OSError, ValueError) as error:  # e.g. AMENT_PREFIX_PATH unset
        raise UriError(f"{where}cannot search the ament index for {package!r}: {error}") from None


def python_package_root(package: str, spec: str = "") -> Path:
    """Folder of the installed Python package ``package``. Raises UriError when it is not installed."""
    where = f"{spec!r}: " if spec else ""
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError) as error:
        raise UriError(f"{where}cannot locate Python package {package!r}: {error}") from error
    if found is None:
        raise UriError(f"{where}Python package {package!r} is not installed")
    if found.submodule_search_locations:
        return Path(next(iter(found.submodule_search_locations)))
    if found.origin:
        return Path(found.origin).parent
    raise UriError(f"{where}Python package {package!r} has no location on disk")


def _running_from_source() -> bool:
    """Whether this module is imported from the source tree (``package.xml`` beside ``rnnpose_ros/``)."""
    return (_OWN_SOURCE_ROOT / "package.xml").is_file() and (_OWN_SOURCE_ROOT / "meshes").is_dir()


@functools.lru_cache(maxsize=256)  # per published marker: the ament index scan is not free
def display_uri(path: Path) -> str:
    """The URI a viewer should load ``path`` with: ``package://<pkg>/<rel>`` when the file lies in a ROS
    package's share directory (or in this package's shared source folders), so that rviz on another
    machine with the package installed finds it; otherwise ``file://`` of the absolute path."""
    absolute, resolved = Path(os.path.abspath(path)), Path(path).resolve()
    own = _own_package_relative(resolved)
    if own is not None:
        return f"{PACKAGE_SCHEME}{_OWN_PACKAGE}/{own}"
    shares = _ament_shares()
    for candidate in (absolute, resolved):  # a share path, or where its symlink points
        for package, share in shares:
            if candidate.is_relative_to(share):
                return f"{PACKAGE_SCHEME}{package}/{candidate.relative_to(share).as_posix()}"
    return resolved.as_uri()


def _own_package_relative(path: Path) -> str | None:
    if not _running_from_source():
        return None
    for folder in _OWN_SHARED_FOLDERS:
        root = _OWN_SOURCE_ROOT / folder
        if path.is_relative_to(root):
            return path.relative_to(_OWN_SOURCE_ROOT).as_posix()
    return None


def _ament_shares() -> list[tuple[str, Path]]:
    """(package, share directory) of every package in the ament index, deepest directory first (a
    package installed inside another's share directory wins); empty without ament_index_python."""
    try:
        from ament_index_python.packages import get_packages_with_prefixes
    except ImportError:
        return []
    try:
        prefixes = get_packages_with_prefixes()
    except (LookupError, OSError, ValueError):
        return []
    shares = [
        (name, Path(os.path.abspath(Path(prefix) / "share" / name))) for name, prefix in prefixes.items()
    ]
    return sorted(shares, key=lambda item: len(item[1].parts), reverse=True)
