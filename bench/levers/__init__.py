"""Settings and in-process measurements that the benchmarks compare against the shipped ones."""
