"""What Pimesh's system tests and benchmarks share: the node under test as a
systemd-nspawn container (`container`) or a QEMU aarch64 VM of the real image (`qemu`),
an over-the-air site with the real central server and a hostile one (`ota_site`), free
ports (`ports`), deadlines (`wait`), HTTP helpers (`http_helpers`) and where the built artefacts
are (`paths`).

Tests import it as `harness.<module>`: tests/pytest.ini puts tests/ on the module path,
and the benchmarks' runner (bench/run.sh) sets PYTHONPATH to it.
"""
