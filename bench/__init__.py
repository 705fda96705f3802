"""Benchmarks (`make bench-*`) and the Orthanc process harness they share with the test suite."""
