"""Parts of the benchmarks that are not scripts of their own."""
