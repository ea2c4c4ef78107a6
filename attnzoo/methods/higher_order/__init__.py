"""Higher-order attention: a query scores tuples of keys instead of single keys (the
triple-wise tensor attention of Alman and Song) — cubic in the sequence length, for
short sequences and for studying what higher-order correlations buy."""
