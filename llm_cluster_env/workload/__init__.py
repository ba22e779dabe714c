"""Workloads: request containers, traces (CSV, Mooncake JSONL), lengths, arrivals, prefix-sharing generators and the workload generator."""
