"""Where the repository's built artefacts are: the host binaries (`make host-bins`), the
amd64 root filesystem (`make image-amd64`) and the arm64 image (`make image`)."""

import glob
import os

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def host_binary(name):
    """A binary built on the host by `make host-bins`: $CARGO_TARGET_DIR/PROFILE/NAME, or
    target/PROFILE/NAME, PROFILE being $PIMESH_HOST_PROFILE (set by the Makefile: `host`
    for the tests, `release` for the benchmarks of the amd64 root's daemons)."""
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")
    profile = os.environ.get("PIMESH_HOST_PROFILE") or "host"
    return os.path.join(os.path.abspath(target), profile, name)


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
