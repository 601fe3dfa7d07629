"""C++ sources of the `cpu` backend, compiled on first use by `spikeinfer.cpu_backend`."""
