"""Data pipeline: readers -> tokenization into units -> packing -> on-disk dataset."""
