"""Where the repository's built artefacts are: the host binaries (`make host-bins`), the
amd64 root filesystem (`make image-amd64`) and the arm64 image (`make image`)."""

import glob
import os

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def host_binary(name):
    """A release binary built on the host: $CARGO_TARGET_DIR/release/NAME, or
    target/release/NAME."""
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")
    return os.path.join(os.path.abspath(target), "release", name)


def _newest(pattern, variable, make):
    if os.environ.get(variable):
        return os.environ[variable]
    found = sorted(glob.glob(os.path.join(REPO, "out", pattern)), key=os.path.getmtime)
    if not found:
        raise RuntimeError(f"no out/{pattern}: run `{make}` first (or set {variable})")
    return found[-1]


def root_path():
    """The amd64 root filesystem under test: $PIMESH_ROOT, or the newest
    out/pimesh-*-amd64.root."""
    return _newest("pimesh-*-amd64.root", "PIMESH_ROOT", "make image-amd64")


def image_path():
    """The arm64 image under test: $PIMESH_IMAGE, or the newest out/pimesh-*-arm64.img.xz."""
    return _newest("pimesh-*-arm64.img.xz", "PIMESH_IMAGE", "make image")
