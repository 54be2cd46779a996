"""The feedback store (DuckDB), its snapshots, the datasets built from them, and the
model registry."""
