"""Data for calibration and evaluation: load rows, sample them disjointly, tokenize them."""
