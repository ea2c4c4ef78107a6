"""Structured and content-routed sparse attention: block layouts, factorised
summaries, retrieval of key blocks, clustering and region routing, learned gates."""
