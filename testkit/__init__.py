"""What the tests and the benchmarks share: the test model cache, the unsplit reference
model, in-process chains, local clusters, a Range-capable HTTP server, network namespaces,
the fuzzing cases, and waiting with a deadline.

Part of the checkout, not of the product: ``scripts/setup.sh`` puts the checkout on the
development venv's path, and no wheel carries this package.
"""
