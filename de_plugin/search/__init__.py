"""The search: the DE engine, the one allocator over per-layer (or per-group) counts, grouping, and the
short fine-tune that chooses among finalists."""
